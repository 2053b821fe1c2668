#!/usr/bin/env python3
"""The OTA flow through a broker running vin-acl and msg-auth, with paho-mqtt clients.

A backend (MQTT 5, loopback TCP) signs an update for each car and publishes it to vehicle/updates/<VIN> (QoS 1).
Simulated cars (MQTT 5 over mutual TLS, each with its own certificate from `tollgate certs`) subscribe to their
own topic, report progress on vehicle/updates/<VIN>/progress and completion on .../status; the broker signs those
reports with the car's certificate identity (msg-auth attest) and the backend checks that signature. Each car
checks its update with its own key: the broker verified the backend's signature and re-signed the update for the
car (msg-auth resign). Along the way a car fails to read another car's updates and a tampered update is refused.

The signing code below follows plugins/msg-auth/README.md ("The signed form") and nothing else: it doubles as a
check that the format can be implemented from its documentation.

Usage: fleet.py --work DIR --tls-port N --tcp-port N VIN...   (run.sh passes these)
Exits 0 when every step behaved as described, 1 otherwise.
"""

import argparse
import base64
import hashlib
import hmac
import struct
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# The demo keys of broker.toml ([plugins.secrets] ota and site).
OTA_KEY = bytes.fromhex("6f74612d6261636b656e642d64656d6f2d6b65792d6e6f742d666f722d70726f64")
SITE_MASTER = bytes.fromhex("736974652d6d61737465722d64656d6f2d6b65792d6e6f742d666f722d70726f64")
WAIT = 10.0

failures = []


def check(condition, what):
    print(("  ok    " if condition else "  FAIL  ") + what, flush=True)
    if not condition:
        failures.append(what)


# --- the msg-auth signed form, version 1 -------------------------------------------------------------------

def field(data):
    return struct.pack(">I", len(data)) + data


def canonical(kid, topic, sub, iss, ts, ctr, exp, retain, payload, nonce=""):
    parts = [b"MQTT-SIG-v1", b"hs256", kid.encode(), topic.encode(), sub.encode(), iss.encode(),
             struct.pack(">Q", ts), struct.pack(">Q", ctr), nonce.encode(), struct.pack(">Q", exp),
             bytes([1 if retain else 0]), b"", b"", b"", payload]
    return b"".join(field(part) for part in parts)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key, kid, topic, sub, iss, ctr, payload):
    ts = int(time.time() * 1000)
    mac = hmac.new(key, canonical(kid, topic, sub, iss, ts, ctr, 0, False, payload), hashlib.sha256).digest()
    return f"v1;alg=hs256;kid={kid};sub={sub};iss={iss};ts={ts};ctr={ctr};mac={b64url(mac)}"


def parse(header):
    parts = header.split(";")
    assert parts[0] == "v1", header
    return dict(part.split("=", 1) for part in parts[1:])


def hkdf_sha256(master, info):
    """RFC 5869 with no salt, 32 bytes: the per-VIN key the broker derives on its side."""
    prk = hmac.new(b"\0" * 32, master, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def verify_attestation(topic, payload, header):
    """Checks a signature the broker made with a per-VIN key: an attested report, or an update re-signed for a car
    (which holds only its own key; the demo derives it from the site master like the broker does)."""
    fields = parse(header)
    key = hkdf_sha256(SITE_MASTER, b"vin-mac-v1:" + fields["sub"].encode())
    exp = int(fields.get("exp", "0"))
    data = canonical(fields["kid"], topic, fields["sub"], fields.get("iss", ""), int(fields.get("ts", "0")),
                     int(fields.get("ctr", "0")), exp, False, payload, fields.get("nonce", ""))
    mac = base64.urlsafe_b64decode(fields["mac"] + "=" * (-len(fields["mac"]) % 4))
    expected = hmac.new(key, data, hashlib.sha256).digest()[: len(mac)]
    return hmac.compare_digest(mac, expected), fields


# --- clients ------------------------------------------------------------------------------------------------

class Client:
    """A paho client with the results of its acknowledgements collected, for a linear script."""

    def __init__(self, client_id, port, tls=None, username=None):
        self.id = client_id
        self.mqtt = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if tls:
            self.mqtt.tls_set(ca_certs=tls["ca"], certfile=tls["cert"], keyfile=tls["key"])
        if username:
            self.mqtt.username_pw_set(username)
        self.lock = threading.Condition()
        self.connack = None
        self.acks = {}
        self.subacks = {}
        self.messages = []
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_publish = self._on_publish
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_message = self._on_message
        self.mqtt.connect("127.0.0.1", port, keepalive=30)
        self.mqtt.loop_start()
        self.wait(lambda: self.connack is not None, f"{client_id} to connect")
        if self.connack.is_failure:
            raise RuntimeError(f"{client_id}: CONNACK {self.connack}")

    def _on_connect(self, _client, _userdata, _flags, reason_code, _properties):
        with self.lock:
            self.connack = reason_code
            self.lock.notify_all()

    def _on_publish(self, _client, _userdata, mid, reason_code, properties):
        with self.lock:
            reason = getattr(properties, "ReasonString", None) if properties else None
            self.acks[mid] = (reason_code, reason)
            self.lock.notify_all()

    def _on_subscribe(self, _client, _userdata, mid, reason_codes, _properties):
        with self.lock:
            self.subacks[mid] = reason_codes
            self.lock.notify_all()

    def _on_message(self, _client, _userdata, message):
        with self.lock:
            self.messages.append(message)
            self.lock.notify_all()

    def wait(self, condition, what, timeout=WAIT):
        with self.lock:
            if not self.lock.wait_for(condition, timeout):
                raise TimeoutError(f"timed out waiting for {what}")

    def subscribe(self, topic):
        _, mid = self.mqtt.subscribe(topic, qos=1)
        self.wait(lambda: mid in self.subacks, f"SUBACK for {topic}")
        return self.subacks[mid][0]

    def publish(self, topic, payload, header=None):
        properties = None
        if header is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.UserProperty = ("x-sig", header)
        info = self.mqtt.publish(topic, payload, qos=1, properties=properties)
        self.wait(lambda: info.mid in self.acks, f"PUBACK for {topic}")
        return self.acks[info.mid]

    def take(self, predicate, what, timeout=WAIT):
        found = []

        def ready():
            for index, message in enumerate(self.messages):
                if predicate(message):
                    found.append(self.messages.pop(index))
                    return True
            return False

        self.wait(ready, what, timeout)
        return found[0]

    def quiet(self, seconds=0.5):
        time.sleep(seconds)
        with self.lock:
            return list(self.messages)

    def close(self):
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


def x_sig(message, name="x-sig"):
    for key, value in getattr(message.properties, "UserProperty", []) or []:
        if key == name:
            return value
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--tls-port", type=int, required=True)
    parser.add_argument("--tcp-port", type=int, required=True)
    parser.add_argument("vins", nargs="+")
    args = parser.parse_args()
    certs = f"{args.work}/certs"

    print("backend connects (user ota-backend) and watches every car's reports")
    backend = Client("ota-backend", args.tcp_port, username="ota-backend")
    check(backend.subscribe("vehicle/updates/+/+").value == 1, "backend subscribed to vehicle/updates/+/+")

    cars = {}
    for vin in args.vins:
        tls = {"ca": f"{certs}/ca.pem", "cert": f"{certs}/{vin}.pem", "key": f"{certs}/{vin}.key"}
        cars[vin] = Client(vin, args.tls_port, tls=tls)
        check(cars[vin].subscribe(f"vehicle/updates/{vin}").value == 1, f"car {vin} subscribed to its own updates")

    first, second = args.vins[0], args.vins[1]
    print(f"car {first} tries to read {second}'s updates")
    refused = cars[first].subscribe(f"vehicle/updates/{second}")
    check(refused.is_failure and refused.value == 0x87, f"refused with SUBACK {refused} (0x87)")
    refused = cars[first].subscribe("vehicle/updates/+")
    check(refused.is_failure, f"vehicle/updates/+ refused too ({refused}): containment, not pattern overlap")

    counter = 1
    print("backend sends each car its signed update")
    for vin in args.vins:
        topic = f"vehicle/updates/{vin}"
        payload = f'{{"firmware":"2.1","url":"https://ota.example/{vin}/2.1.bin"}}'.encode()
        reason, _ = backend.publish(topic, payload, sign(OTA_KEY, "ota-2026", topic, vin, "ota", counter, payload))
        counter += 1
        check(not reason.is_failure, f"update for {vin} accepted ({reason})")

    print("cars install and report; the broker signs their reports, the backend checks the signatures")
    for vin, car in cars.items():
        update = car.take(lambda m, vin=vin: m.topic == f"vehicle/updates/{vin}", f"{vin}'s update")
        # The broker verified the backend's signature and re-signed the update with this car's own key.
        valid, fields = verify_attestation(update.topic, update.payload, x_sig(update) or "v1;mac=")
        chained = x_sig(update, "x-sig-prev")
        check(valid and fields["sub"] == vin and fields["kid"] == "vin-1" and fields["iss"] == "dealer-0042"
              and chained is not None and parse(chained)["kid"] == "ota-2026",
              f"car {vin} verified its update with its own key (re-signed by {fields.get('iss')}; "
              f"the backend's signature kept in x-sig-prev)")
        for step in ("25", "50", "100"):
            car.publish(f"vehicle/updates/{vin}/progress", step.encode())
        car.publish(f"vehicle/updates/{vin}/status", b"installed")
        for topic, payload in [(f"vehicle/updates/{vin}/progress", b"100"), (f"vehicle/updates/{vin}/status", b"installed")]:
            report = backend.take(lambda m, t=topic, p=payload: m.topic == t and m.payload == p, topic)
            valid, fields = verify_attestation(report.topic, report.payload, x_sig(report) or "v1;mac=")
            check(valid and fields["sub"] == vin and fields["iss"] == "dealer-0042",
                  f"{report.topic} = {report.payload.decode()}: attested for sub={fields.get('sub')} by {fields.get('iss')}")

    print("a tampered update: signed for firmware 2.1, sent as 6.6")
    topic = f"vehicle/updates/{first}"
    signed_payload = b'{"firmware":"2.1"}'
    header = sign(OTA_KEY, "ota-2026", topic, first, "ota", counter, signed_payload)
    counter += 1
    reason, text = backend.publish(topic, b'{"firmware":"6.6"}', header)
    check(reason.is_failure and reason.value == 0x87, f"refused with PUBACK {reason} ({text})")
    print("the same signed update replayed")
    good = b'{"firmware":"2.2"}'
    header = sign(OTA_KEY, "ota-2026", topic, first, "ota", counter, good)
    reason, _ = backend.publish(topic, good, header)
    check(not reason.is_failure, "the genuine 2.2 update is accepted once")
    reason, text = backend.publish(topic, good, header)
    check(reason.is_failure and reason.value == 0x87, f"its replay is refused with PUBACK {reason} ({text})")
    print("an update signed for one car, sent to another")
    other_topic = f"vehicle/updates/{second}"
    misdirected = sign(OTA_KEY, "ota-2026", other_topic, first, "ota", counter + 1, good)
    reason, text = backend.publish(other_topic, good, misdirected)
    check(reason.is_failure and text == "msg-auth: sub_mismatch", f"refused with PUBACK {reason} ({text})")

    cars[first].take(lambda m: m.payload == good, "the 2.2 update")
    leftovers = [m.payload for m in cars[first].quiet()] + [m.payload for m in cars[second].quiet()]
    check(not leftovers, f"no car received a refused message (extra: {leftovers})")

    for car in cars.values():
        car.close()
    backend.close()
    print("all steps as expected" if not failures else f"{len(failures)} step(s) failed: {failures}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
