#![no_main]
//! See `roboger_tests::fuzz::manage_body`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| roboger_tests::fuzz::manage_body(data));
