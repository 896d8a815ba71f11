//! gram-train: not implemented yet (issue 4). The crate exists so that the workspace layout and
//! its pinned dependencies are in place; it exports nothing.
