//! pmsnap VMM library.
