//! What every GRAM-rs binary does the same way: parsing (a usage error exits 1, like any other
//! mistake of the user's), exit statuses (0 ok, 1 the user's error, 2 an internal fault), one
//! line per error, progress bars (`-q/--quiet`, `NO_PROGRESS`), the thread count (`--threads`)
//! and a quiet end on a closed pipe.

use std::process::ExitCode;

/// The `Environment:` section of a binary's `--help`: its own variables (lines of the form
/// `"  NAME  what it does"`), then those every binary reads.
#[macro_export]
macro_rules! env_help {
    ($($line:literal),* $(,)?) => {
        concat!(
            "Environment:\n",
            $($line, "\n",)*
            "  NO_PROGRESS          any value: no progress bars, as with --quiet\n",
            "  RAYON_NUM_THREADS    worker threads when --threads is not given (default: one per core)",
        )
    };
}

/// Parses the command line: `--help` and `--version` print and exit 0, a usage error prints
/// clap's message and exits 1.
pub fn parse<T: clap::Parser>() -> T {
    T::try_parse().unwrap_or_else(|e| {
        let code = if e.use_stderr() { 1 } else { 0 };
        let _ = e.print();
        std::process::exit(code)
    })
}

/// Whether to draw progress bars: not with `--quiet`, not when `NO_PROGRESS` is set.
pub fn progress(quiet: bool) -> bool {
    !quiet && std::env::var_os("NO_PROGRESS").is_none()
}

/// Sizes the process's worker pool (tokenisation, CPU kernels) to `threads` (None: rayon's
/// default, `RAYON_NUM_THREADS` or one per core); returns the size.
pub fn set_threads(n: Option<usize>) -> usize {
    if let Some(n) = n.filter(|&n| n > 0) {
        // Fails only when the pool already exists: then it keeps its size.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    threads()
}

/// The worker pool's size (what `--threads` set).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Lets a closed output pipe end the process quietly, as it ends `cat` or `grep`: Rust starts
/// programs with SIGPIPE ignored, so `gram-model inspect m.gguf | head -3` made `println!`
/// panic on the broken pipe. Every binary but the server calls this first. No-op off Unix.
pub fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    #[allow(unsafe_code)]
    // SAFETY: restores the default disposition of one signal before any other thread exists;
    // `signal` has no memory-safety preconditions for SIGPIPE with SIG_DFL.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Prints `error: ...` in one line and gives the exit status: 1 for a problem with the user's
/// input, 2 for an internal error.
pub fn exit_with(err: &dyn std::fmt::Display, user_error: bool) -> ExitCode {
    eprintln!("error: {err}");
    ExitCode::from(if user_error { 1 } else { 2 })
}
