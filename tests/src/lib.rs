//! Test harness shared by the end-to-end tests: locating the built binaries, and (later)
//! network namespaces that stand in for hosts.
