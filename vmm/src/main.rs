//! `pmsnap`: command-line entry point.

fn main() {}
