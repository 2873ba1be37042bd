//! Moving frames over connections: blocking [`read_frame`] / [`write_frame`] / [`call`]
//! for the agent's side, and [`FrameBuffer`], the incremental splitter for the VMM's
//! side where bytes arrive in pieces.

use std::io::{Read, Write};

use super::{FrameHeader, GuestRequest, ProtocolError, Reply, HEADER_LEN, MAX_PAYLOAD_LEN};

/// Read one whole frame (header and payload) from a blocking stream, checking the
/// header before allocating the payload. Returns `Ok(None)` on a clean end of stream
/// before the first header byte.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ProtocolError::Truncated {
                    got,
                    want: HEADER_LEN,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e.to_string())),
        }
    }
    let header = FrameHeader::parse(&head)?;
    let mut frame = vec![0u8; HEADER_LEN + header.len as usize];
    frame[..HEADER_LEN].copy_from_slice(&head);
    r.read_exact(&mut frame[HEADER_LEN..])
        .map_err(|e| ProtocolError::Io(e.to_string()))?;
    Ok(Some(frame))
}

/// Write one frame to a blocking stream.
pub fn write_frame<W: Write>(w: &mut W, frame: &[u8]) -> Result<(), ProtocolError> {
    w.write_all(frame)
        .and_then(|()| w.flush())
        .map_err(|e| ProtocolError::Io(e.to_string()))
}

/// Send one request on a blocking stream and wait for its reply (the agent's side of
/// an exchange).
pub fn call<S: Read + Write>(stream: &mut S, req: &GuestRequest) -> Result<Reply, ProtocolError> {
    write_frame(stream, &req.encode()?)?;
    let frame = read_frame(stream)?
        .ok_or_else(|| ProtocolError::Io("connection closed before the reply".into()))?;
    Reply::decode(&frame)
}

/// Incremental frame splitter for a byte stream that arrives in pieces (the VMM side
/// of a vsock connection). Feed bytes with [`FrameBuffer::push`], take whole frames with
/// [`FrameBuffer::next_frame`]. A bad header is reported once and poisons the buffer:
/// after garbage there is no way to find the next frame boundary, so the caller should
/// answer with an error and close the connection.
///
/// Linear in the bytes received: taken frames advance a start offset, and the buffer is
/// compacted once per [`FrameBuffer::push`] after frames were taken (a chunk of many tiny
/// frames is not shifted down once per frame).
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    /// Where the first byte not yet returned as a frame is.
    start: usize,
    poisoned: bool,
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes. Returns an error (and poisons) when the pending data would
    /// exceed one maximal frame, which a well-behaved peer never sends unanswered.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        if self.poisoned {
            return Ok(());
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let limit = HEADER_LEN + MAX_PAYLOAD_LEN as usize;
        if self.buf.len() + bytes.len() > limit {
            // Validate the header first so the error says why.
            if let Some(Err(e)) = self.header() {
                self.poisoned = true;
                return Err(e);
            }
            self.poisoned = true;
            return Err(ProtocolError::TooLarge(
                (self.buf.len() + bytes.len()) as u64,
            ));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn header(&self) -> Option<Result<FrameHeader, ProtocolError>> {
        let head: &[u8; HEADER_LEN] = self
            .buf
            .get(self.start..self.start + HEADER_LEN)?
            .try_into()
            .ok()?;
        Some(FrameHeader::parse(head))
    }

    /// Take the next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        if self.poisoned {
            return Ok(None);
        }
        let header = match self.header() {
            None => return Ok(None),
            Some(Ok(h)) => h,
            Some(Err(e)) => {
                self.poisoned = true;
                self.buf.clear();
                self.start = 0;
                return Err(e);
            }
        };
        let total = HEADER_LEN + header.len as usize;
        if self.pending() < total {
            return Ok(None);
        }
        let frame = self.buf[self.start..self.start + total].to_vec();
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(frame))
    }

    /// Bytes buffered and not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether a bad header stopped this buffer.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }
}

#[cfg(test)]
mod tests {
    use crate::protocol::test_util::save;
    use crate::protocol::*;

    #[test]
    fn frame_buffer_splits_a_stream() {
        let a = GuestRequest::new(0, save()).encode().expect("encode");
        let b = GuestRequest::new(5, Request::List)
            .encode()
            .expect("encode");
        let mut stream = a.clone();
        stream.extend_from_slice(&b);
        let mut fb = FrameBuffer::new();
        let mut frames = Vec::new();
        for chunk in stream.chunks(5) {
            fb.push(chunk).expect("push");
            while let Some(f) = fb.next_frame().expect("frame") {
                frames.push(f);
            }
        }
        assert_eq!(frames, vec![a, b]);
        assert_eq!(fb.pending(), 0);

        let mut fb = FrameBuffer::new();
        fb.push(b"GET / HTTP/1.1\r\n").expect("push");
        assert!(matches!(fb.next_frame(), Err(ProtocolError::BadMagic(_))));
        assert!(fb.is_poisoned());
        assert_eq!(fb.next_frame(), Ok(None));
    }

    #[test]
    fn a_chunk_of_many_small_frames_splits_into_all_of_them_with_a_partial_tail() {
        let list = GuestRequest::new(0, Request::List)
            .encode()
            .expect("encode");
        // A maximal chunk of small frames (the case a shift per frame made quadratic),
        // then the first half of one more, finished by a second push.
        let n = (HEADER_LEN + MAX_PAYLOAD_LEN as usize) / list.len() - 1;
        let mut chunk: Vec<u8> = list.iter().copied().cycle().take(n * list.len()).collect();
        chunk.extend_from_slice(&list[..list.len() / 2]);
        let mut fb = FrameBuffer::new();
        fb.push(&chunk).expect("push");
        let mut count = 0;
        while let Some(f) = fb.next_frame().expect("frame") {
            assert_eq!(f, list);
            count += 1;
        }
        assert_eq!(count, n);
        assert_eq!(fb.pending(), list.len() / 2);
        fb.push(&list[list.len() / 2..]).expect("push the rest");
        assert_eq!(fb.next_frame().expect("frame"), Some(list.clone()));
        assert_eq!(fb.pending(), 0);
        // The limit counts only what is pending, not frames already taken.
        fb.push(&chunk[..list.len() * 2]).expect("push");
        assert_eq!(fb.pending(), list.len() * 2);
    }

    #[test]
    fn blocking_read_and_write() {
        let f = GuestRequest::new(0, save()).encode().expect("encode");
        let mut wire = Vec::new();
        write_frame(&mut wire, &f).expect("write");
        write_frame(&mut wire, &f).expect("write");
        let mut cur = std::io::Cursor::new(wire);
        assert_eq!(read_frame(&mut cur).expect("read"), Some(f.clone()));
        assert_eq!(read_frame(&mut cur).expect("read"), Some(f));
        assert_eq!(read_frame(&mut cur).expect("eof"), None);
        let mut cur = std::io::Cursor::new(vec![0x4e, 0x53]);
        assert!(matches!(
            read_frame(&mut cur),
            Err(ProtocolError::Truncated { .. })
        ));
    }

    #[test]
    fn call_over_a_socket() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let server = std::thread::spawn(move || {
            let f = read_frame(&mut b).expect("read").expect("frame");
            let name = match GuestRequest::decode(&f).expect("request").op {
                Request::Delete { name } => name,
                other => panic!("unexpected {other:?}"),
            };
            write_frame(&mut b, &Reply::Deleted { name }.encode().expect("encode")).expect("write");
            // Then hang up without answering the second call.
            let _ = read_frame(&mut b);
        });
        let r = call(
            &mut a,
            &GuestRequest::new(0, Request::Delete { name: "n".into() }),
        )
        .expect("call");
        assert_eq!(r, Reply::Deleted { name: "n".into() });
        a.shutdown(std::net::Shutdown::Write).expect("shutdown");
        server.join().expect("server");
        assert!(matches!(
            call(&mut a, &GuestRequest::new(0, Request::List)),
            Err(ProtocolError::Io(_))
        ));
    }
}
