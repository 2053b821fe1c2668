//! Decodes arbitrary bytes as a stream of packets with both protocol versions. Decoding must never panic, every
//! packet returned must consume bytes, and every packet decoded must survive encode -> decode unchanged.
//!
//! Input layout: the first byte picks the maximum packet size (so that the size check is reached both on the
//! fixed header alone and on whole packets); the rest is the byte stream.
//!
//! Round-trip equality is asserted on the decoded values, not on the input bytes, because several valid
//! encodings decode to the same packet and the encoder always writes the shortest one:
//! - variable byte integers that are not minimal (remaining length, property length, property identifier,
//!   subscription identifier), which the decoder accepts as Mosquitto does;
//! - properties in any order (the encoder writes them in one fixed order);
//! - a v5 PUBACK/PUBREC/PUBREL/PUBCOMP or DISCONNECT that spells out reason code 0x00 and/or an empty property
//!   block, which the encoder omits; an AUTH with 0x00 and no properties likewise;
//! - a CONNECT read with either decoder version, since CONNECT carries its own protocol level.
//!
//! Two lossy cases this target found in the decoder have been fixed rather than excused: a 3.1.1 CONNACK return
//! code is now mapped to its v5 reason code (the inverse of the encoder's `to_v3_connack`), and a 3.1.1 SUBACK
//! return code other than 0x00, 0x01, 0x02 or 0x80 is rejected [MQTT-3.9.3-2]. Re-encoding the re-decoded packet
//! must then reproduce the first re-encoding byte for byte.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tollgate_protocol::encode::encoded_len;
use tollgate_protocol::{Packet, ProtocolVersion, decode_packet, encode_packet};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let max_packet_size = match selector % 4 {
        0 => 16,
        1 => 256,
        2 => 4096,
        _ => 1 << 20,
    };
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        decode_stream(stream, version, max_packet_size);
    }
});

fn decode_stream(stream: &[u8], version: ProtocolVersion, max_packet_size: usize) {
    let mut buffer = BytesMut::from(stream);
    loop {
        let before = buffer.len();
        match decode_packet(&mut buffer, version, max_packet_size) {
            Ok(Some(packet)) => {
                assert!(buffer.len() < before, "{packet:?} decoded from no bytes");
                assert_round_trip(&packet, version);
            }
            Ok(None) => {
                assert_eq!(buffer.len(), before, "bytes consumed without a packet");
                return;
            }
            Err(error) => {
                assert!(error.reason_code().is_error(), "{error:?}");
                return;
            }
        }
    }
}

fn encode(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    let written = match encode_packet(packet, version, &mut out) {
        Ok(written) => written,
        Err(error) => panic!("decoded packet does not encode: {error:?}\n{packet:?}"),
    };
    assert_eq!(written, out.len(), "encode_packet miscounted\n{packet:?}");
    assert_eq!(encoded_len(packet, version), Ok(written), "encoded_len disagrees\n{packet:?}");
    out
}

fn assert_round_trip(packet: &Packet, version: ProtocolVersion) {
    let encoded = encode(packet, version);
    let mut input = encoded.clone();
    let again = match decode_packet(&mut input, version, usize::MAX) {
        Ok(Some(again)) => again,
        other => panic!("re-encoded packet does not decode: {other:?}\n{packet:?}\n{encoded:02X?}"),
    };
    assert!(input.is_empty(), "re-encoded packet has trailing bytes");
    assert_eq!(&again, packet, "value changed by encode -> decode");
    assert_eq!(encode(&again, version), encoded, "encoding is not canonical");
}
