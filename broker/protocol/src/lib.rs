//! MQTT 3.1.1 and 5.0 wire format.
//!
//! This crate is sans-IO: it turns bytes into [`Packet`]s and back and validates everything the two
//! specifications require of a packet in isolation. It never reads a socket, never looks at a clock and never
//! panics on any input (the `fuzz/` target and the property tests enforce that). Protocol state that spans
//! packets (packet-id reuse, topic aliases, flow control) belongs to the broker core.
//!
//! Layout: [`packet`] holds the packet types, [`properties`] the MQTT 5 properties, [`decode`] and [`encode`]
//! the codec, [`topic`] topic-name and filter rules, [`reason`] the reason codes.

pub mod decode;
pub mod encode;
pub mod error;
pub mod packet;
pub mod properties;
pub mod reason;
pub mod topic;

pub use decode::{Decoder, decode_packet};
pub use encode::{EncodeError, encode_packet};
pub use error::DecodeError;
pub use packet::*;
pub use properties::{Properties, UserProperty};
pub use reason::ReasonCode;

/// The largest remaining length the variable-byte integer can express (MQTT-1.5.5).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;
