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

/// Returns memory freed since to the OS now (mimalloc's
/// `mi_collect(true)`): the calling thread's free pages, and the arenas'
/// free blocks, where large buffers (media) go. mimalloc purges only when
/// it allocates or frees, so a process that goes quiet after a burst of
/// large requests would otherwise keep that memory resident; purging at
/// once on every free (`purge_delay` 0) cost 7% of small-event
/// throughput (BENCHMARKS.md), so the server and the plugins call this
/// every second ([`spawn_periodic_release`]).
pub fn release_free_memory() {
    // SAFETY: a plain call into the allocator, which is thread-safe.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Calls [`release_free_memory`] every second on the current tokio
/// runtime, until the task is aborted.
pub fn spawn_periodic_release() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            release_free_memory();
        }
    })
}
