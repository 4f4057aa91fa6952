#![no_main]
//! See `roboger_tests::fuzz::rpc_lines`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| roboger_tests::fuzz::rpc_lines(data));
