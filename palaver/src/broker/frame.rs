//! Just enough of MQTT's framing for the front door: a packet's fixed
//! header, the fields of CONNECT that say who connects, the topic of a
//! PUBLISH, and a CONNACK to refuse with. MQTT 3.1, 3.1.1 and 5 share all
//! of these but CONNECT's properties and CONNACK's shape.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Packet type of CONNECT, in the high nibble of the first byte.
pub const CONNECT: u8 = 1;
/// Packet type of PUBLISH.
pub const PUBLISH: u8 = 3;
/// The retain flag of a PUBLISH, in the first byte.
pub const RETAIN: u8 = 0x01;

/// A packet's fixed header as read, kept raw to be forwarded unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// Packet type and flags.
    pub first: u8,
    /// The bytes of the remaining length as they were sent (1 to 4).
    pub length_bytes: [u8; 4],
    /// How many of `length_bytes` are used.
    pub length_len: usize,
    /// Bytes after the fixed header.
    pub remaining: usize,
}

impl FixedHeader {
    /// The packet type (1 CONNECT, 3 PUBLISH, ...).
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// Bytes of the fixed header itself.
    pub fn len(&self) -> usize {
        1 + self.length_len
    }

    /// The header's bytes, with `first` possibly changed by the caller.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.length_len);
        out.push(self.first);
        out.extend_from_slice(&self.length_bytes[..self.length_len]);
        out
    }
}

/// Reads one fixed header; `None` at a clean end of stream before it.
/// Byte by byte, so that nothing after the header is consumed.
pub async fn read_fixed_header<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<FixedHeader>> {
    let mut buf = [0u8; 5];
    if r.read(&mut buf[..1]).await? == 0 {
        return Ok(None);
    }
    for len in 2..=buf.len() {
        buf[len - 1] = r.read_u8().await?;
        if let Some(header) = parse_fixed_header(&buf[..len])? {
            return Ok(Some(header));
        }
    }
    // parse_fixed_header has refused a fifth length byte by now.
    Err(malformed("remaining length over 4 bytes"))
}

/// The fixed header at the start of `buf`, if all of it is there.
pub fn parse_fixed_header(buf: &[u8]) -> io::Result<Option<FixedHeader>> {
    let Some((&first, rest)) = buf.split_first() else {
        return Ok(None);
    };
    let mut length_bytes = [0u8; 4];
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = rest.get(i) else {
            return Ok(None);
        };
        length_bytes[i] = b;
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(FixedHeader {
                first,
                length_bytes,
                length_len: i + 1,
                remaining,
            }));
        }
    }
    Err(malformed("remaining length over 4 bytes"))
}

fn malformed(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed MQTT packet: {why}"),
    )
}

/// Who a CONNECT says is connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level: 3 (3.1), 4 (3.1.1) or 5.
    pub level: u8,
    /// The client id (may be empty).
    pub client_id: String,
    /// The user name, when the user name flag is set.
    pub username: Option<String>,
    /// The password, when the password flag is set.
    pub password: Option<Vec<u8>>,
}

/// A cursor over a packet body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(malformed("shorter than its fields"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> io::Result<usize> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A two-byte length and that many bytes.
    fn binary(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }

    fn string(&mut self) -> io::Result<String> {
        String::from_utf8(self.binary()?.to_vec()).map_err(|_| malformed("a string not UTF-8"))
    }

    /// MQTT 5's variable byte integer.
    fn varint(&mut self) -> io::Result<usize> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("variable byte integer over 4 bytes"))
    }

    /// MQTT 5 properties: skipped.
    fn skip_properties(&mut self) -> io::Result<()> {
        let n = self.varint()?;
        self.take(n).map(|_| ())
    }
}

/// Reads the body of a CONNECT (after its fixed header).
pub fn parse_connect(body: &[u8]) -> io::Result<Connect> {
    let mut b = Body(body);
    let protocol = b.binary()?;
    if protocol != b"MQTT" && protocol != b"MQIsdp" {
        return Err(malformed("not an MQTT protocol name"));
    }
    let level = b.u8()?;
    let flags = b.u8()?;
    let _keep_alive = b.u16()?;
    if level == 5 {
        b.skip_properties()?;
    }
    let client_id = b.string()?;
    if flags & 0x04 != 0 {
        if level == 5 {
            b.skip_properties()?;
        }
        let _will_topic = b.binary()?;
        let _will_payload = b.binary()?;
    }
    let username = if flags & 0x80 != 0 {
        Some(b.string()?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(b.binary()?.to_vec())
    } else {
        None
    };
    Ok(Connect {
        level,
        client_id,
        username,
        password,
    })
}

/// The topic of a PUBLISH body (its first field).
pub fn publish_topic(body: &[u8]) -> io::Result<&[u8]> {
    Body(body).binary()
}

/// Why the door refuses a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong or missing user name or password.
    BadLogin,
    /// No connection left for this client.
    Full,
}

/// The CONNACK that refuses a CONNECT of protocol `level`.
pub fn connack(level: u8, refusal: Refusal) -> Vec<u8> {
    if level == 5 {
        // Reason codes 0x86 (bad user name or password), 0x97 (quota
        // exceeded); then an empty property list.
        let code = match refusal {
            Refusal::BadLogin => 0x86,
            Refusal::Full => 0x97,
        };
        vec![0x20, 0x03, 0x00, code, 0x00]
    } else {
        // 3.1.1's return codes 4 (bad user name or password) and 3 (server
        // unavailable), which 3.1 shares.
        let code = match refusal {
            Refusal::BadLogin => 4,
            Refusal::Full => 3,
        };
        vec![0x20, 0x02, 0x00, code]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_length(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let mut n = body.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    fn field(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    fn connect_body(level: u8, flags: u8, fields: &[&[u8]]) -> Vec<u8> {
        let mut body = field(b"MQTT");
        body.extend([level, flags, 0, 30]);
        if level == 5 {
            body.push(0);
        }
        for f in fields {
            body.extend(field(f));
        }
        body
    }

    #[tokio::test]
    async fn fixed_headers_keep_their_bytes() {
        for n in [0usize, 127, 128, 16_383, 16_384, 1 << 20] {
            let packet = with_length(0x31, &vec![0; n]);
            let mut r = &packet[..];
            let h = read_fixed_header(&mut r).await.unwrap().unwrap();
            assert_eq!(h.kind(), PUBLISH);
            assert_eq!(h.remaining, n);
            assert_eq!(h.bytes(), packet[..packet.len() - n]);
        }
        let mut empty: &[u8] = &[];
        assert!(read_fixed_header(&mut empty).await.unwrap().is_none());
        let mut endless: &[u8] = &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(read_fixed_header(&mut endless).await.is_err());
    }

    #[test]
    fn fixed_headers_in_a_buffer() {
        let packet = with_length(0x31, &[0; 200]);
        let h = parse_fixed_header(&packet).unwrap().unwrap();
        assert_eq!((h.kind(), h.remaining, h.length_len), (PUBLISH, 200, 2));
        assert_eq!(parse_fixed_header(&packet[..2]).unwrap(), None);
        assert_eq!(parse_fixed_header(&[]).unwrap(), None);
        assert!(parse_fixed_header(&[0x30, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn connect_fields() {
        let body = connect_body(4, 0xc2, &[b"cid", b"alice", b"pw"]);
        let c = parse_connect(&body).unwrap();
        assert_eq!(
            c,
            Connect {
                level: 4,
                client_id: "cid".into(),
                username: Some("alice".into()),
                password: Some(b"pw".to_vec()),
            }
        );
        // With a will, which comes between the client id and the login.
        let body = connect_body(4, 0xc6, &[b"cid", b"will/t", b"bye", b"bob", b"x"]);
        let c = parse_connect(&body).unwrap();
        assert_eq!(c.username.as_deref(), Some("bob"));
        assert_eq!(c.password.as_deref(), Some(&b"x"[..]));
        // MQTT 5: properties after the keep-alive.
        let c = parse_connect(&connect_body(5, 0x82, &[b"v5", b"carol"])).unwrap();
        assert_eq!((c.level, c.client_id.as_str()), (5, "v5"));
        assert_eq!(c.username.as_deref(), Some("carol"));
        assert_eq!(c.password, None);
        // No login at all.
        let c = parse_connect(&connect_body(4, 0x02, &[b""])).unwrap();
        assert_eq!((c.client_id.as_str(), c.username), ("", None));
    }

    #[test]
    fn broken_connects_are_errors() {
        assert!(parse_connect(b"").is_err());
        assert!(parse_connect(&connect_body(4, 0xc2, &[b"cid", b"alice"])).is_err());
        let mut other = field(b"HTTP");
        other.extend([4, 0, 0, 30]);
        assert!(parse_connect(&other).is_err());
    }

    #[test]
    fn refusals() {
        assert_eq!(connack(4, Refusal::BadLogin), [0x20, 2, 0, 4]);
        assert_eq!(connack(4, Refusal::Full), [0x20, 2, 0, 3]);
        assert_eq!(connack(5, Refusal::BadLogin), [0x20, 3, 0, 0x86, 0]);
        assert_eq!(publish_topic(&field(b"a/b")).unwrap(), b"a/b");
    }
}
