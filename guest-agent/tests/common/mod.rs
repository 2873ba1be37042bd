//! A fake snapshot service for host tests of the agent, the library and the test
//! program. It speaks the real protocol over a Unix socket, validates every request
//! with the VMM-side helpers ([`Request::validate`]), and checks that the frame numbers
//! the agent sends are the ones the host kernel's pagemap shows for those addresses at
//! that moment. It cannot read guest-physical pages on the host, so it keeps content by
//! virtual address: it reads the saved pages through /proc/PID/mem and writes restored
//! ones the same way (the real VMM copies guest-physical pages instead).

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use guest_agent::protocol::{
    total_pages, write_frame, ErrorCode, ErrorReply, FrameBuffer, GuestRequest, Reply, Request,
    Run, SnapshotInfo, PAGE_SIZE,
};

/// "Guest RAM" size for validation: larger than any host frame number.
pub const RAM_PAGES: u64 = 1 << 40;

/// A saved snapshot: content per page, `None` for absent pages (zero).
#[derive(Debug, Clone)]
pub struct Snap {
    pub pid: u32,
    pub comm: String,
    pub pages: Vec<Option<Vec<u8>>>,
    pub runs: u32,
}

#[derive(Debug, Default)]
pub struct State {
    pub snaps: HashMap<String, Snap>,
    /// Where restores go; the connecting process when `None`.
    pub restore_pid: Option<u32>,
    /// Requests seen (kind names), for assertions.
    pub seen: Vec<String>,
    /// The guest uid each request was made for.
    pub uids: Vec<u32>,
}

pub struct FakeVmm {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub state: Arc<Mutex<State>>,
}

impl FakeVmm {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snapshot.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                let st = st.clone();
                std::thread::spawn(move || serve(&mut c, &st));
            }
        });
        Self { dir, path, state }
    }

    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state lock")
    }
}

fn serve(c: &mut UnixStream, st: &Mutex<State>) {
    // Read in small pieces, the way the VMM receives vsock packets.
    let mut fb = FrameBuffer::new();
    let mut buf = [0u8; 4096];
    let frame = loop {
        let n = match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Err(e) = fb.push(&buf[..n]) {
            reply(c, Reply::Error(ErrorReply::from(&e)));
            return;
        }
        match fb.next_frame() {
            Ok(Some(f)) => break f,
            Ok(None) => {}
            Err(e) => {
                reply(c, Reply::Error(ErrorReply::from(&e)));
                return;
            }
        }
    };
    let peer = guest_agent::gateway::peer_cred(c).expect("SO_PEERCRED").pid;
    let r = match GuestRequest::decode(&frame).and_then(|r| r.validate(RAM_PAGES).map(|()| r)) {
        Err(e) => Reply::Error(ErrorReply::from(&e)),
        Ok(req) => {
            st.lock().expect("state lock").uids.push(req.uid);
            handle(req.op, peer, st)
        }
    };
    reply(c, r);
}

fn reply(c: &mut UnixStream, r: Reply) {
    let _ = write_frame(c, &r.encode().expect("encode reply"));
}

fn err(code: ErrorCode, m: impl Into<String>) -> Reply {
    Reply::Error(ErrorReply::new(code, m))
}

/// Check each run against the process's pagemap now: present runs must map exactly
/// the frames claimed, absent runs must be absent.
fn check_frames(pid: u32, runs: &[Run]) -> Result<(), String> {
    let pm = File::open(format!("/proc/{pid}/pagemap")).map_err(|e| e.to_string())?;
    for r in runs {
        let mut raw = vec![0u8; r.count as usize * 8];
        pm.read_exact_at(&mut raw, r.virt_addr / PAGE_SIZE * 8)
            .map_err(|e| e.to_string())?;
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8"));
            let present = e >> 63 == 1;
            let pfn = e & ((1 << 55) - 1);
            let va = r.virt_addr + i as u64 * PAGE_SIZE;
            if present != r.present {
                return Err(format!(
                    "page {va:#x}: present {present}, run says {}",
                    r.present
                ));
            }
            if present && pfn != r.guest_phys_first_page + i as u64 {
                return Err(format!(
                    "page {va:#x}: frame {pfn:#x}, run says {:#x}",
                    r.guest_phys_first_page + i as u64
                ));
            }
        }
    }
    Ok(())
}

fn handle(req: Request, peer: u32, st: &Mutex<State>) -> Reply {
    let mut st = st.lock().expect("state lock");
    match req {
        Request::Save(s) => {
            st.seen.push("save".into());
            if st.snaps.contains_key(&s.name) {
                return err(
                    ErrorCode::AlreadyExists,
                    format!("snapshot {} exists", s.name),
                );
            }
            if let Err(e) = check_frames(s.pid, &s.runs) {
                return err(ErrorCode::Internal, format!("frame check: {e}"));
            }
            let mem = match File::open(format!("/proc/{}/mem", s.pid)) {
                Ok(m) => m,
                Err(e) => return err(ErrorCode::Internal, e.to_string()),
            };
            let mut pages = Vec::new();
            for r in &s.runs {
                for i in 0..r.count {
                    if r.present {
                        let mut p = vec![0u8; PAGE_SIZE as usize];
                        if let Err(e) = mem.read_exact_at(&mut p, r.virt_addr + i * PAGE_SIZE) {
                            return err(ErrorCode::Internal, e.to_string());
                        }
                        pages.push(Some(p));
                    } else {
                        pages.push(None);
                    }
                }
            }
            let present = pages.iter().filter(|p| p.is_some()).count() as u64;
            let total = pages.len() as u64;
            st.snaps.insert(
                s.name.clone(),
                Snap {
                    pid: s.pid,
                    comm: s.comm,
                    pages,
                    runs: s.runs.len() as u32,
                },
            );
            Reply::Saved {
                name: s.name,
                pages: total,
                present_pages: present,
            }
        }
        Request::Restore(r) => {
            st.seen.push("restore".into());
            let target = st.restore_pid.unwrap_or(peer);
            let Some(snap) = st.snaps.get(&r.name) else {
                return err(ErrorCode::NotFound, format!("no snapshot named {}", r.name));
            };
            let want = snap.pages.len() as u64;
            let got = total_pages(&r.runs);
            if want != got {
                return err(
                    ErrorCode::SizeMismatch,
                    format!("snapshot {} has {want} pages, target has {got}", r.name),
                );
            }
            if let Err(e) = check_frames(target, &r.runs) {
                return err(ErrorCode::Internal, format!("frame check: {e}"));
            }
            let mem = match OpenOptions::new()
                .write(true)
                .open(format!("/proc/{target}/mem"))
            {
                Ok(m) => m,
                Err(e) => return err(ErrorCode::Internal, e.to_string()),
            };
            let zero = vec![0u8; PAGE_SIZE as usize];
            let mut k = 0;
            for run in &r.runs {
                for i in 0..run.count {
                    let src = snap.pages[k].as_deref().unwrap_or(&zero);
                    if let Err(e) = mem.write_all_at(src, run.virt_addr + i * PAGE_SIZE) {
                        return err(ErrorCode::Internal, e.to_string());
                    }
                    k += 1;
                }
            }
            Reply::Restored {
                name: r.name,
                pages: got,
            }
        }
        Request::List => {
            st.seen.push("list".into());
            let mut v: Vec<SnapshotInfo> = st
                .snaps
                .iter()
                .map(|(n, s)| SnapshotInfo {
                    name: n.clone(),
                    uid: 0,
                    pid: s.pid,
                    comm: s.comm.clone(),
                    pages: s.pages.len() as u64,
                    present_pages: s.pages.iter().filter(|p| p.is_some()).count() as u64,
                    runs: s.runs,
                    created_unix: 1,
                })
                .collect();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            Reply::List(v)
        }
        Request::Delete { name } => {
            st.seen.push("delete".into());
            if st.snaps.remove(&name).is_some() {
                Reply::Deleted { name }
            } else {
                err(ErrorCode::NotFound, format!("no snapshot named {name}"))
            }
        }
    }
}
