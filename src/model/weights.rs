//! Checkpoint weights (placeholder until the model module lands).
