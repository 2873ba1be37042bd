//! Helpers shared by pmsnap's integration tests: locating the built binaries and the
//! default guest image, and deciding whether KVM is there at all.
