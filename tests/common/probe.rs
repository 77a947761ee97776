//! Timed sampling of reads through paths and open descriptors: when a value stopped being
//! served and when an errno started (rotation, revocation, outage bounds).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::files::{errno_of, pread_start, read};

/// One timed read of a [`Probe`]: when it started and ended (since the sampling's origin) and
/// what it returned, the bytes or the errno.
#[derive(Debug)]
pub struct Sample {
    pub started: Duration,
    pub ended: Duration,
    pub got: Result<Vec<u8>, i32>,
}

/// A file read over and over by [`sample_reads`], through its path or through a descriptor
/// opened earlier, and what each read returned.
pub struct Probe<'a> {
    pub what: String,
    reader: Box<dyn FnMut() -> io::Result<Vec<u8>> + 'a>,
    pub samples: Vec<Sample>,
}

/// Where a [`Probe`]'s reads stopped returning a value: the last read that returned it and the
/// first that failed.
#[derive(Debug)]
pub struct CutOff<'a> {
    pub last_served: Option<&'a Sample>,
    pub first_failed: Option<&'a Sample>,
}

impl<'a> Probe<'a> {
    /// Reads of the whole file at `path` ([`read`]).
    pub fn path(what: &str, path: &Path) -> Probe<'a> {
        let path = path.to_path_buf();
        Probe {
            what: what.to_string(),
            reader: Box::new(move || read(&path)),
            samples: Vec::new(),
        }
    }

    /// `pread`s at offset 0 of a descriptor opened earlier ([`pread_start`]).
    pub fn descriptor(what: &str, file: &Arc<File>) -> Probe<'a> {
        let file = file.clone();
        Probe {
            what: what.to_string(),
            reader: Box::new(move || pread_start(&file)),
            samples: Vec::new(),
        }
    }

    /// One read now (not recorded).
    pub fn read(&mut self) -> io::Result<Vec<u8>> {
        (self.reader)()
    }

    /// The last read that returned `value` and the first that failed; panics, naming the read,
    /// if a read returned anything else, failed with another errno than `errno`, or returned
    /// `value` again after one had failed (the cut-off is for good).
    pub fn cut_off(&self, value: &[u8], errno: i32) -> CutOff<'_> {
        let mut cut = CutOff {
            last_served: None,
            first_failed: None,
        };
        for s in &self.samples {
            match &s.got {
                Ok(bytes) if bytes == value => {
                    if let Some(failed) = cut.first_failed {
                        panic!(
                            "{}: served again by the read started at {:?} after the read \
                             started at {:?} failed with errno {:?}",
                            self.what, s.started, failed.started, failed.got
                        );
                    }
                    cut.last_served = Some(s);
                }
                Err(e) if *e == errno => {
                    cut.first_failed = cut.first_failed.or(Some(s));
                }
                other => panic!(
                    "{}: the read started at {:?} returned {:?}, expected {:?} or {}",
                    self.what,
                    s.started,
                    other
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned()),
                    String::from_utf8_lossy(value),
                    io::Error::from_raw_os_error(errno)
                ),
            }
        }
        cut
    }
}

/// Reads through every probe in turn, every `every`, until `until` has passed since `origin`;
/// each read's start and end are recorded relative to `origin`.
pub fn sample_reads(origin: Instant, until: Duration, every: Duration, probes: &mut [Probe<'_>]) {
    while origin.elapsed() < until {
        for p in probes.iter_mut() {
            let started = origin.elapsed();
            let got = p.read().map_err(|e| errno_of(&e));
            p.samples.push(Sample {
                started,
                ended: origin.elapsed(),
                got,
            });
        }
        thread::sleep(every);
    }
}
