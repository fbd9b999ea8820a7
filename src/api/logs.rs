//! A job's log as `GET /v1/jobs/{id}/logs` reads it: the part its query asks for (the last
//! lines, or the bytes from an offset on), across the log's rotations, streamed.

use axum::body::Body;
use serde::Deserialize;
use utoipa::IntoParams;

use super::ApiError;

/// The query of `GET /v1/jobs/{id}/logs`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct LogParams {
    /// Only the last N lines. Cannot be combined with offset.
    #[param(example = 20)]
    pub tail: Option<usize>,
    /// Only the bytes from this offset on: pass the x-log-size of the previous read to
    /// follow a log. Cannot be combined with tail.
    #[param(example = 0)]
    pub offset: Option<u64>,
}

/// A job's log across its rotations (see `executor::supervisor::LogWriter`): offsets count
/// the job's whole output, so a follower's next offset stays right when the log rotates
/// under it. A follower behind the current file gets the rest of the rotated part first;
/// what was rotated away twice is gone, and it goes on from what is left.
pub(super) async fn read_rotated_log(
    path: &std::path::Path,
    params: &LogParams,
) -> Result<(Body, u64), ApiError> {
    let cannot = |e: std::io::Error, path: &std::path::Path| {
        ApiError::Internal(format!("cannot read {}: {e}", path.display()))
    };
    let offsets = crate::executor::supervisor::LogOffsets::new(path);
    let base = offsets.base();
    if let Some(offset) = params.offset.filter(|o| *o < base) {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let rotated = offsets.rotated();
        match tokio::fs::File::open(&rotated).await {
            Ok(mut old) => {
                let len = old.metadata().await.map_err(|e| cannot(e, &rotated))?.len();
                let start = offset.saturating_sub(base.saturating_sub(len)).min(len);
                old.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(|e| cannot(e, &rotated))?;
                // The rest of the rotated part, then the current log as far as it is now.
                let (current, size) = match tokio::fs::File::open(path).await {
                    Ok(file) => {
                        let size = file.metadata().await.map_err(|e| cannot(e, path))?.len();
                        (Some(file), size)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, 0),
                    Err(e) => return Err(cannot(e, path)),
                };
                let old = old.take(len - start);
                let body = match current {
                    Some(file) => Body::from_stream(tokio_util::io::ReaderStream::new(
                        old.chain(file.take(size)),
                    )),
                    None => Body::from_stream(tokio_util::io::ReaderStream::new(old)),
                };
                return Ok((body, base + size));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(cannot(e, &rotated)),
        }
    }
    let file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        // A job that has not started yet has no output yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Body::empty(), base)),
        Err(e) => {
            return Err(ApiError::Internal(format!(
                "cannot open {}: {e}",
                path.display()
            )));
        }
    };
    let within = LogParams {
        tail: params.tail,
        offset: params.offset.map(|o| o.saturating_sub(base)),
    };
    let (body, size) = read_log(file, &within).await.map_err(|e| cannot(e, path))?;
    Ok((body, base + size))
}

/// The part of a log the parameters ask for, streamed (a trainer's log can be far larger
/// than memory should hold), and the log's size when it was read. Only the bytes up to that
/// size are sent, so a follower that asks again from it sees every byte once.
async fn read_log(mut file: tokio::fs::File, params: &LogParams) -> std::io::Result<(Body, u64)> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let size = file.metadata().await?.len();
    let start = match (params.offset, params.tail) {
        (Some(offset), _) => offset.min(size),
        (None, Some(lines)) => tail_start(&mut file, size, lines).await?,
        (None, None) => 0,
    };
    file.seek(std::io::SeekFrom::Start(start)).await?;
    let stream = tokio_util::io::ReaderStream::new(file.take(size - start));
    Ok((Body::from_stream(stream), size))
}

/// Where the last `lines` lines of the first `size` bytes begin, read backwards in blocks.
async fn tail_start(file: &mut tokio::fs::File, size: u64, lines: usize) -> std::io::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    const BLOCK: u64 = 64 * 1024;
    if lines == 0 {
        return Ok(size);
    }
    let mut end = size;
    // A final newline ends the last line; it does not start an empty one.
    let mut newlines_to_skip = lines + 1;
    let mut first_block = true;
    let mut buf = vec![0u8; BLOCK as usize];
    while end > 0 {
        let begin = end.saturating_sub(BLOCK);
        let len = (end - begin) as usize;
        file.seek(std::io::SeekFrom::Start(begin)).await?;
        file.read_exact(&mut buf[..len]).await?;
        let block = &buf[..len];
        let mut scan = block.len();
        if first_block {
            first_block = false;
            if block.last() != Some(&b'\n') {
                newlines_to_skip -= 1;
            }
        }
        while let Some(i) = block[..scan].iter().rposition(|&b| b == b'\n') {
            newlines_to_skip -= 1;
            if newlines_to_skip == 0 {
                return Ok(begin + i as u64 + 1);
            }
            scan = i;
        }
        end = begin;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn read(text: &str, tail: Option<usize>, offset: Option<u64>) -> (String, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, text).unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        let (body, size) = read_log(file, &LogParams { tail, offset }).await.unwrap();
        let bytes = body.collect().await.unwrap().to_bytes();
        (String::from_utf8(bytes.to_vec()).unwrap(), size)
    }

    #[tokio::test]
    async fn tail_gives_the_last_lines() {
        assert_eq!(read("a\nb\nc\n", Some(2), None).await, ("b\nc\n".into(), 6));
        assert_eq!(read("a\nb\nc", Some(2), None).await, ("b\nc".into(), 5));
        assert_eq!(read("a\nb\nc\n", Some(9), None).await.0, "a\nb\nc\n");
        assert_eq!(read("a\nb\nc\n", Some(0), None).await.0, "");
        assert_eq!(read("", Some(3), None).await, ("".into(), 0));
        // Across the 64 KiB blocks it reads backwards in.
        let long: String = (0..20_000).map(|n| format!("line {n}\n")).collect();
        let (tail, _) = read(&long, Some(3), None).await;
        assert_eq!(tail, "line 19997\nline 19998\nline 19999\n");
    }

    #[tokio::test]
    async fn offset_gives_what_came_after_it() {
        assert_eq!(read("abcdef", None, Some(4)).await, ("ef".into(), 6));
        assert_eq!(read("abcdef", None, Some(6)).await, ("".into(), 6));
        assert_eq!(read("abcdef", None, Some(99)).await, ("".into(), 6));
        assert_eq!(read("abcdef", None, None).await, ("abcdef".into(), 6));
    }
}
