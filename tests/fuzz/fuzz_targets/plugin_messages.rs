#![no_main]
//! See `roboger_tests::fuzz::plugin_messages`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| roboger_tests::fuzz::plugin_messages(data));
