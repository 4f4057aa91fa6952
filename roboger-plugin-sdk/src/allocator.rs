//! mimalloc as the global allocator of every binary that links the SDK
//! with its default `mimalloc` feature: the server and the plugins.
//!
//! The protocol allocates and frees many small buffers per message, often
//! on different threads; glibc's malloc spent about 15% of the server's
//! CPU there under load, and a plugin on glibc's malloc used 2 to 12%
//! more CPU per event (three A/B runs) with no lower peak RSS. A plugin
//! that wants another allocator builds the SDK with
//! `default-features = false`.
#![allow(unsafe_code)]

/// The allocator itself.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs from `.init_array`, before `main` and before any Rust allocation:
/// arenas are committed as they are used rather than up front, which on
/// Linux otherwise keeps about 15 MiB more resident in an idle server.
#[used]
#[unsafe(link_section = ".init_array")]
static LAZY_COMMIT: extern "C" fn() = {
    extern "C" fn set() {
        /// `mi_option_arena_eager_commit` in mimalloc v3's `mi_option_e`
        /// (libmimalloc-sys has no constant for it; the crate is pinned in
        /// the workspace manifest so an update that renumbers is seen).
        const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
        // SAFETY: stores an integer in mimalloc's option table; no other
        // thread exists yet.
        unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) }
    }
    set
};
