#![no_main]
//! See `roboger_tests::fuzz::config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| roboger_tests::fuzz::config(data));
