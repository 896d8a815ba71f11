//! gram-score: not implemented yet (issue 5). The crate exists so that the workspace layout and
//! its pinned dependencies are in place; it exports nothing.
