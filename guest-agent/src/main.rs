//! `pmsnap-agent`: the guest side of pmsnap.

fn main() {
    println!("pmsnap-agent {}", guest_agent::VERSION);
}
