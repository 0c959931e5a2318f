//! slm-depth: see DESIGN.md.
