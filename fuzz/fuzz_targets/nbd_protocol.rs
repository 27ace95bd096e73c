//! The NBD wire decoders: client flags, option headers and option data, request headers and
//! their validation never panic, and what they accept stays within the session's limits.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use s3backer::frontend::nbd::protocol::{
    self, Command, OPTION_HEADER_LEN, REQUEST_HEADER_LEN, SessionLimits,
};

#[derive(Arbitrary, Debug)]
enum Message {
    ClientFlags([u8; 4]),
    OptionHeader([u8; OPTION_HEADER_LEN]),
    /// Option number (small values are the known options) and its data.
    Option(u8, Vec<u8>),
    Request([u8; REQUEST_HEADER_LEN]),
    /// A request with the right magic, so the fuzzer reaches check_request at once.
    ValidMagicRequest([u8; REQUEST_HEADER_LEN - 4]),
}

#[derive(Arbitrary, Debug)]
struct Input {
    export_size: u64,
    read_only: bool,
    structured: bool,
    base_allocation: bool,
    messages: Vec<Message>,
}

fuzz_target!(|input: Input| {
    let limits = SessionLimits {
        export_size: input.export_size,
        read_only: input.read_only,
        structured: input.structured,
        base_allocation: input.base_allocation,
    };
    for message in input.messages {
        match message {
            Message::ClientFlags(bytes) => {
                let _ = protocol::parse_client_flags(bytes);
            }
            Message::OptionHeader(bytes) => {
                let _ = protocol::parse_option_header(&bytes);
            }
            Message::Option(option, data) => {
                if data.len() <= protocol::MAX_OPTION_LEN as usize {
                    let _ = protocol::parse_option(u32::from(option), &data);
                }
            }
            Message::Request(bytes) => check(&bytes, &limits),
            Message::ValidMagicRequest(rest) => {
                let mut bytes = [0u8; REQUEST_HEADER_LEN];
                bytes[..4].copy_from_slice(&protocol::REQUEST_MAGIC.to_be_bytes());
                bytes[4..].copy_from_slice(&rest);
                check(&bytes, &limits);
            }
        }
    }
});

fn check(bytes: &[u8; REQUEST_HEADER_LEN], limits: &SessionLimits) {
    let Ok(request) = protocol::parse_request(bytes) else {
        return;
    };
    let _ = request.fua();
    let _ = request.payload_len();
    if protocol::check_request(&request, limits).is_ok() {
        // An accepted request never reaches past the export nor carries an oversize payload.
        if !matches!(request.command, Command::Disc | Command::Flush) {
            assert!(request.offset + u64::from(request.len) <= limits.export_size);
        }
        assert!(request.payload_len() <= protocol::MAX_PAYLOAD);
        assert!(!matches!(request.command, Command::Unknown(_)));
    }
}
