//! slm-lora: see DESIGN.md.
