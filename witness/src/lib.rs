//! The witness: the arbiter that decides which node of an FT pair may run alone.
