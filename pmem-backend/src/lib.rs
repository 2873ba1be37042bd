//! The pmsnap pool file and its persistent copy-on-write snapshot store.
