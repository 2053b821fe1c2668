//! Native implementations of the hook contract that ship inside the broker: the anonymous-access switch, a
//! Mosquitto-compatible `password_file` and a Mosquitto-compatible `acl_file`. File contents arrive as text; the
//! server crate does the reading.

pub mod acl_file;
pub mod password_file;
