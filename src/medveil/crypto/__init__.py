"""Pure cryptographic building blocks: no I/O, no clocks, no global randomness."""
