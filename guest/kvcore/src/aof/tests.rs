//! Tests of the log codec.
