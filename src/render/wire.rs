//! The pipe protocol between the daemon and a render worker: length-prefixed parts carrying a
//! request (template source and the secrets' data) one way and a rendering (output, what it
//! read, its error) the other, each read within a size bound.

use std::io::{self, Read, Write};
use std::sync::Arc;

use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::secret::SecretData;
use crate::spec::SecretPath;
use crate::template::{self, RenderError, Rendered};

/// Largest request or response part read (a worker's memory limit bounds what it can build
/// anyway; this bounds what the daemon reads from one).
const MAX_PART: usize = 64 << 20;

// Wire format, both ways: a part is a little-endian u32 length and that many bytes. A request
// is a JSON header `{"source", "secrets": [[path, length], ...]}` and then each secret's data
// as JSON, one part each; a response is a JSON header `{"used", "needed", "error"}` and the
// output as one part.

fn write_part(to: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("part too large"))?;
    to.write_all(&len.to_le_bytes())?;
    to.write_all(bytes)
}

fn read_part(from: &mut impl Read, max: usize) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut len = [0u8; 4];
    from.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::other(format!("a part of {len} bytes")));
    }
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    from.read_exact(&mut bytes)?;
    Ok(bytes)
}

pub(super) fn write_request(
    to: &mut impl Write,
    source: &str,
    given: &[(SecretPath, &SecretData)],
) -> io::Result<()> {
    let header = json!({
        "source": source,
        "secrets": given.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
    });
    write_part(to, header.to_string().as_bytes())?;
    for (_, data) in given {
        let bytes = data.render(None).map_or(&[][..], |b| b.expose());
        write_part(to, bytes)?;
    }
    to.flush()
}

/// A template's source and the secrets it is rendered over.
type Request = (Arc<str>, Vec<(SecretPath, SecretData)>);

/// A request, or `None` at the end of input.
pub(super) fn read_request(from: &mut impl Read) -> io::Result<Option<Request>> {
    let header = match read_part(from, MAX_PART) {
        Ok(h) => h,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    let header: Value = serde_json::from_slice(&header).map_err(io::Error::other)?;
    let source: Arc<str> = Arc::from(header["source"].as_str().unwrap_or_default());
    let mut given = Vec::new();
    for path in header["secrets"].as_array().into_iter().flatten() {
        let path =
            SecretPath::parse(path.as_str().unwrap_or_default()).map_err(io::Error::other)?;
        let bytes = read_part(from, MAX_PART)?;
        let map = match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        given.push((path, SecretData::from_json(map)));
    }
    Ok(Some((source, given)))
}

fn error_json(err: &RenderError) -> Value {
    let (kind, text) = match err {
        RenderError::Needs(p) => ("needs", p.as_str().to_string()),
        RenderError::BadPath(m) => ("bad_path", m.clone()),
        RenderError::MissingField(m) => ("missing_field", m.clone()),
        RenderError::Limit(m) => ("limit", m.clone()),
        RenderError::Failed(m) => ("failed", m.clone()),
        RenderError::Unavailable(m) => ("unavailable", m.clone()),
    };
    json!({"kind": kind, "text": text})
}

fn error_from_json(v: &Value) -> io::Result<RenderError> {
    let text = v["text"].as_str().unwrap_or_default().to_string();
    Ok(match v["kind"].as_str().unwrap_or_default() {
        "needs" => RenderError::Needs(SecretPath::parse(&text).map_err(io::Error::other)?),
        "bad_path" => RenderError::BadPath(text),
        "missing_field" => RenderError::MissingField(text),
        "limit" => RenderError::Limit(text),
        "unavailable" => RenderError::Unavailable(text),
        _ => RenderError::Failed(text),
    })
}

pub(super) fn write_response(to: &mut impl Write, rendered: &Rendered) -> io::Result<()> {
    let paths = |ps: &[SecretPath]| {
        ps.iter()
            .map(|p| p.as_str().to_string())
            .collect::<Vec<_>>()
    };
    let header = json!({
        "used": paths(&rendered.used),
        "needed": rendered.needed.as_ref().map(|p| p.as_str()),
        "error": rendered.result.as_ref().err().map(error_json),
    });
    write_part(to, header.to_string().as_bytes())?;
    let out = rendered.result.as_ref().map_or(&[][..], |o| &o[..]);
    write_part(to, out)?;
    to.flush()
}

pub(super) fn read_response(from: &mut impl Read) -> io::Result<Rendered> {
    // What a worker can send back: a short header and an output under the cap.
    let header = read_part(from, 1 << 20)?;
    let header: Value = serde_json::from_slice(&header).map_err(io::Error::other)?;
    let out = read_part(from, template::MAX_OUTPUT_BYTES)?;
    let parse =
        |v: &Value| SecretPath::parse(v.as_str().unwrap_or_default()).map_err(io::Error::other);
    let used = header["used"]
        .as_array()
        .into_iter()
        .flatten()
        .map(parse)
        .collect::<io::Result<Vec<_>>>()?;
    let needed = match &header["needed"] {
        Value::Null => None,
        v => Some(parse(v)?),
    };
    let result = match &header["error"] {
        Value::Null => Ok(out),
        e => Err(error_from_json(e)?),
    };
    Ok(Rendered {
        result,
        used,
        needed,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::path;
    use super::*;

    #[test]
    fn requests_and_responses_cross_the_wire_whole() {
        let data = SecretData::from_pairs([("user", "app"), ("password", "pw")]);
        let mut wire = Vec::new();
        write_request(&mut wire, "{{ 1 }}", &[(path("secret/a"), &data)]).unwrap();
        let (source, given) = read_request(&mut &wire[..]).unwrap().unwrap();
        assert_eq!(&*source, "{{ 1 }}");
        assert_eq!(given, vec![(path("secret/a"), data)]);
        assert!(read_request(&mut &[][..]).unwrap().is_none());

        for rendered in [
            Rendered {
                result: Ok(Zeroizing::new(b"out".to_vec())),
                used: vec![path("secret/a")],
                needed: None,
            },
            Rendered {
                result: Err(RenderError::Needs(path("secret/b"))),
                used: vec![path("secret/a")],
                needed: Some(path("secret/b")),
            },
            Rendered::failed(RenderError::Limit("fuel".into())),
        ] {
            let mut wire = Vec::new();
            write_response(&mut wire, &rendered).unwrap();
            let back = read_response(&mut &wire[..]).unwrap();
            assert_eq!(back.result.as_deref().ok(), rendered.result.as_deref().ok());
            assert_eq!(back.result.as_ref().err(), rendered.result.as_ref().err());
            assert_eq!(back.used, rendered.used);
            assert_eq!(back.needed, rendered.needed);
        }
    }
}
