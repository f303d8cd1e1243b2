//! Bringing a diverged disk back in line with blake3 block hashes.
