//! slm-width: see DESIGN.md.
