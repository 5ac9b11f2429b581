//! A minimal blocking NBD client: fixed newstyle handshake with NBD_OPT_GO,
//! then simple replies (no structured replies are negotiated). Enough to
//! pipeline WRITE and FLUSH requests from one thread and read their replies
//! on another.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use blockmirror_nbd::proto::{self, InfoRequest, OptionHeader, RequestHeader};
use bytes::BytesMut;

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// host:port
    Tcp(String),
    Unix(PathBuf),
}

/// A parsed `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub target: Target,
    pub export: String,
}

impl Uri {
    pub fn parse(s: &str) -> Result<Uri> {
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let rest = rest.strip_prefix('/').unwrap_or(rest);
            let (export, query) = rest
                .split_once('?')
                .with_context(|| format!("{s}: nbd+unix URI without ?socket="))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .with_context(|| format!("{s}: nbd+unix URI without ?socket="))?;
            return Ok(Uri {
                target: Target::Unix(PathBuf::from(socket)),
                export: export.to_owned(),
            });
        }
        let Some(rest) = s.strip_prefix("nbd://") else {
            bail!("{s}: not an nbd:// or nbd+unix:// URI");
        };
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        if hostport.is_empty() {
            bail!("{s}: no host");
        }
        let has_port = hostport.rfind(':').is_some_and(|i| {
            !hostport[i..].contains(']') && hostport[i + 1..].parse::<u16>().is_ok()
        });
        let hostport = if has_port {
            hostport.to_owned()
        } else {
            format!("{hostport}:10809")
        };
        Ok(Uri {
            target: Target::Tcp(hostport),
            export: export.to_owned(),
        })
    }
}

/// A connected socket of either kind.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// An export after NBD_OPT_GO: ready for requests.
#[derive(Debug)]
pub struct Connection {
    pub stream: Stream,
    pub size: u64,
    pub transmission_flags: u16,
}

impl Connection {
    pub fn read_only(&self) -> bool {
        self.transmission_flags & proto::TF_READ_ONLY != 0
    }

    pub fn can_flush(&self) -> bool {
        self.transmission_flags & proto::TF_SEND_FLUSH != 0
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// Connects and negotiates the export with NBD_OPT_GO.
pub fn connect(uri: &Uri) -> Result<Connection> {
    let mut stream = match &uri.target {
        Target::Tcp(a) => {
            let s = TcpStream::connect(a).with_context(|| format!("connecting to {a}"))?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        }
        Target::Unix(p) => Stream::Unix(
            UnixStream::connect(p).with_context(|| format!("connecting to {}", p.display()))?,
        ),
    };
    // The handshake must not hang a test forever.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let hello: [u8; 18] = read_array(&mut stream).context("reading the server's greeting")?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().expect("8"));
    let newstyle = u64::from_be_bytes(hello[8..16].try_into().expect("8"));
    let hflags = u16::from_be_bytes([hello[16], hello[17]]);
    if magic != proto::NBD_MAGIC || newstyle != proto::IHAVEOPT {
        bail!("not a newstyle NBD server (magic {magic:#x} {newstyle:#x})");
    }
    if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        bail!("server does not speak fixed newstyle");
    }
    let mut cflags = proto::CLIENT_FIXED_NEWSTYLE;
    if hflags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::CLIENT_NO_ZEROES;
    }
    stream.write_all(&cflags.to_be_bytes())?;

    let mut payload = BytesMut::new();
    InfoRequest {
        export: uri.export.clone(),
        infos: vec![],
    }
    .encode(&mut payload);
    let mut out = BytesMut::new();
    OptionHeader {
        option: proto::OPT_GO,
        len: payload.len() as u32,
    }
    .encode(&mut out);
    out.extend_from_slice(&payload);
    stream.write_all(&out)?;

    let mut size = None;
    let mut tflags = 0u16;
    loop {
        let h: [u8; 20] = read_array(&mut stream).context("reading an option reply")?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8"));
        let option = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        if magic != proto::OPT_REPLY_MAGIC || option != proto::OPT_GO {
            bail!("bad option reply (magic {magic:#x}, option {option})");
        }
        if len > proto::MAX_OPTION_LEN {
            bail!("option reply of {len} bytes is too long");
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        match kind {
            proto::REP_ACK => break,
            proto::REP_INFO
                if data.len() >= 12
                    && u16::from_be_bytes([data[0], data[1]]) == proto::INFO_EXPORT =>
            {
                size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8")));
                tflags = u16::from_be_bytes([data[10], data[11]]);
            }
            k if k & (1 << 31) != 0 => bail!(
                "server refused export {:?} (reply {k:#x}): {}",
                uri.export,
                String::from_utf8_lossy(&data)
            ),
            _ => {}
        }
    }
    let size = size.context("server sent no export size")?;
    stream.set_read_timeout(None)?;
    Ok(Connection {
        stream,
        size,
        transmission_flags: tflags,
    })
}

/// Encodes a request header (a WRITE's payload follows it).
pub fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, out: &mut BytesMut) {
    RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        len,
    }
    .encode(out);
}

/// Reads one simple reply header (WRITE, FLUSH and DISC replies carry no
/// data); returns (error, cookie).
pub fn read_simple_reply(r: &mut impl Read) -> std::io::Result<(u32, u64)> {
    let b: [u8; 16] = read_array(r)?;
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4"));
    if magic != proto::SIMPLE_REPLY_MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad reply magic {magic:#010x}"),
        ));
    }
    let error = u32::from_be_bytes(b[4..8].try_into().expect("4"));
    let cookie = u64::from_be_bytes(b[8..16].try_into().expect("8"));
    Ok((error, cookie))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        let u = Uri::parse("nbd://127.0.0.1:10809/db").unwrap();
        assert_eq!(u.target, Target::Tcp("127.0.0.1:10809".into()));
        assert_eq!(u.export, "db");
        let u = Uri::parse("nbd://localhost/x").unwrap();
        assert_eq!(u.target, Target::Tcp("localhost:10809".into()));
        let u = Uri::parse("nbd+unix:///db?socket=/run/a.sock").unwrap();
        assert_eq!(u.target, Target::Unix("/run/a.sock".into()));
        assert_eq!(u.export, "db");
        assert!(Uri::parse("http://x/").is_err());
        assert!(Uri::parse("nbd+unix:///db").is_err());
    }
}
