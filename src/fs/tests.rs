//! The fs layer over `MockSource` on paused time: what each operation fetches, answers and
//! audits, and how files follow rotations.

use super::*;
use crate::cache::CacheConfig;
use crate::metrics::Metrics;
use crate::source::mock::MockSource;
use crate::source::SourceError;
use crate::spec::parse_secret_arg;

/// A volume of `args` (`name=path[#key]`) over a `MockSource` holding `secret/db` (`user`,
/// `password`) and `secret/api` (`token`), strict, with the kernel invalidations it reports.
pub(crate) struct World {
    pub(crate) source: Arc<MockSource>,
    pub(crate) fs: VaultFs<MockSource>,
    invalidated: Arc<Mutex<Vec<InodeNo>>>,
}

pub(crate) fn world(args: &[&str]) -> World {
    world_in(args, Consistency::Strict)
}

fn world_in(args: &[&str], consistency: Consistency) -> World {
    let entries = args.iter().map(|a| parse_secret_arg(a).unwrap()).collect();
    world_of(entries, consistency)
}

fn world_of(entries: Vec<crate::spec::SecretEntry>, consistency: Consistency) -> World {
    let source = Arc::new(MockSource::new());
    source.put("secret/db", &[("user", "app"), ("password", "pw-1")]);
    source.put("secret/api", &[("token", "t-1")]);
    let spec = Arc::new(VolumeSpec::new(entries).unwrap());
    let invalidated = Arc::new(Mutex::new(Vec::new()));
    let sink = invalidated.clone();
    let cache = Arc::new(
        SecretCache::new(
            source.clone(),
            CacheConfig::default(),
            Arc::new(Metrics::new()),
        )
        .with_swap_hook(swap_hook(
            spec.clone(),
            Box::new(move |i| sink.lock().push(i)),
        )),
    );
    let config = FsConfig {
        volume: "test".into(),
        pod: None,
        uid: 1000,
        gid: 2000,
        file_mode: 0o440,
        kernel_ttl: Duration::from_secs(1),
        consistency,
    };
    let fs = VaultFs::new(spec, cache, config);
    World {
        source,
        fs,
        invalidated,
    }
}

const SPEC: [&str; 3] = [
    "db/password=secret/db#password",
    "db/all=secret/db",
    "api=secret/api#token",
];

async fn read_all(fs: &VaultFs<MockSource>, ino: InodeNo, fh: u64) -> Vec<u8> {
    fs.read(ino, fh, 0, 4096).await.unwrap().bytes().to_vec()
}

#[tokio::test(start_paused = true)]
async fn listing_directories_fetches_nothing() {
    let w = world(&SPEC);
    let root = w.fs.readdir(InodeNo::ROOT, 0).unwrap();
    let names: Vec<_> = root.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, [".", "..", "api", "db"]);
    let db =
        w.fs.lookup(InodeNo::ROOT, "db", Caller::default())
            .await
            .unwrap();
    assert_eq!(db.kind, Kind::Dir);
    assert_eq!(db.perm, 0o550);
    let sub: Vec<_> =
        w.fs.readdir(db.ino, 2)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
    assert_eq!(sub, ["all", "password"]);
    assert_eq!(w.source.reads(), 0);
}

#[tokio::test(start_paused = true)]
async fn lookup_fetches_only_the_touched_secret_and_reports_its_size() {
    let w = world(&SPEC);
    let attr =
        w.fs.lookup(InodeNo::ROOT, "api", Caller::default())
            .await
            .unwrap();
    assert_eq!((attr.kind, attr.size, attr.perm), (Kind::File, 3, 0o440));
    assert_eq!((attr.uid, attr.gid), (1000, 2000));
    assert_eq!(w.source.reads(), 1);
    assert_eq!(
        w.fs.lookup(InodeNo::ROOT, "nope", Caller::default()).await,
        Err(FsError::NotFound)
    );
}

#[tokio::test(start_paused = true)]
async fn key_gives_raw_field_and_no_key_gives_json() {
    let w = world(&SPEC);
    let db =
        w.fs.lookup(InodeNo::ROOT, "db", Caller::default())
            .await
            .unwrap()
            .ino;
    let pw =
        w.fs.lookup(db, "password", Caller::default())
            .await
            .unwrap()
            .ino;
    let all = w.fs.lookup(db, "all", Caller::default()).await.unwrap().ino;
    let caller = Caller::default();
    let fh = w.fs.open(pw, false, caller).await.unwrap();
    assert_eq!(read_all(&w.fs, pw, fh).await, b"pw-1");
    let fh = w.fs.open(all, false, caller).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&read_all(&w.fs, all, fh).await).unwrap();
    assert_eq!(json, serde_json::json!({"user": "app", "password": "pw-1"}));
    assert_eq!(w.source.reads(), 1, "both files share one secret");
    let part = w.fs.read(pw, fh + 100, 1, 2).await.unwrap();
    assert_eq!(part.bytes(), b"w-");
}

#[tokio::test(start_paused = true)]
async fn open_handle_keeps_its_version_across_rotation() {
    let w = world(&SPEC);
    let api =
        w.fs.lookup(InodeNo::ROOT, "api", Caller::default())
            .await
            .unwrap()
            .ino;
    let old = w.fs.open(api, false, Caller::default()).await.unwrap();
    w.source.put("secret/api", &[("token", "t-2-longer")]);
    tokio::time::advance(Duration::from_secs(31)).await;
    let new = w.fs.open(api, false, Caller::default()).await.unwrap();
    assert_eq!(read_all(&w.fs, api, new).await, b"t-2-longer");
    assert_eq!(read_all(&w.fs, api, old).await, b"t-1");
    assert_eq!(w.fs.getattr(api, Caller::default()).await.unwrap().size, 10);
    assert_eq!(*w.invalidated.lock(), vec![api]);
    w.fs.release(old);
    w.fs.release(new);
    assert_eq!(w.fs.open_handles(), 0);
}

#[test]
fn consistency_parses_and_names_the_choices() {
    assert_eq!("cached".parse(), Ok(Consistency::Cached));
    assert_eq!("strict".parse(), Ok(Consistency::Strict));
    let err = "eventual".parse::<Consistency>().unwrap_err();
    assert!(err.contains("\"eventual\""), "{err}");
    assert!(err.contains("cached, strict"), "{err}");
    let parsed: Consistency = serde_json::from_str("\"cached\"").unwrap();
    assert_eq!(parsed, Consistency::Cached);
    assert_eq!(Consistency::default(), Consistency::Cached);
}

#[tokio::test(start_paused = true)]
async fn cached_mode_times_attributes_by_freshness_and_reads_the_reported_version() {
    let w = world_in(&SPEC, Consistency::Cached);
    let caller = Caller::default();
    let api = w.fs.lookup(InodeNo::ROOT, "api", caller).await.unwrap();
    assert_eq!(
        api.ttl,
        Duration::from_secs(30),
        "a fresh value: the whole TTL"
    );
    let db = w.fs.lookup(InodeNo::ROOT, "db", caller).await.unwrap();
    assert_eq!(
        db.ttl,
        Duration::from_secs(1),
        "directories keep the volume's"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    let again = w.fs.getattr(api.ino, caller).await.unwrap();
    assert_eq!(again.ttl, Duration::from_secs(20), "the rest of the TTL");
    // Rotated in Vault and re-checked by the cache: reads without a handle keep serving
    // the version the kernel was last told about until attributes are answered again.
    w.source.put("secret/api", &[("token", "t-2-longer")]);
    tokio::time::advance(Duration::from_secs(21)).await;
    w.fs.open_unpinned(api.ino, false, caller).await.unwrap();
    assert_eq!(w.fs.open_handles(), 0, "no version pinned");
    assert_eq!(read_all(&w.fs, api.ino, 0).await, b"t-1");
    let new = w.fs.getattr(api.ino, caller).await.unwrap();
    assert_eq!(new.size, 10);
    assert!(new.mtime > api.mtime);
    assert_eq!(read_all(&w.fs, api.ino, 0).await, b"t-2-longer");
    // Deleted in Vault: the next answer is ENOENT and reads stop serving the old version.
    w.source.delete("secret/api");
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(w.fs.getattr(api.ino, caller).await, Err(FsError::NotFound));
    assert!(w.fs.read(api.ino, 0, 0, 4096).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn errors_map_to_errnos() {
    let w = world(&[
        "gone=secret/missing",
        "nokey=secret/api#nokey",
        "api=secret/api#token",
    ]);
    let gone = w.fs.spec.child(InodeNo::ROOT, "gone").unwrap().ino;
    let err = w.fs.open(gone, false, Caller::default()).await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT);
    let err =
        w.fs.lookup(InodeNo::ROOT, "nokey", Caller::default())
            .await
            .unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT);
    let api = w.fs.spec.child(InodeNo::ROOT, "api").unwrap().ino;
    assert_eq!(
        w.fs.open(api, true, Caller::default())
            .await
            .unwrap_err()
            .errno(),
        libc::EROFS
    );
    assert_eq!(
        w.fs.open(InodeNo::ROOT, false, Caller::default())
            .await
            .unwrap_err()
            .errno(),
        libc::EISDIR
    );
    assert_eq!(w.fs.readdir(api, 0).unwrap_err().errno(), libc::ENOTDIR);
    w.source.fail(SourceError::PermissionDenied);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(
        w.fs.getattr(api, Caller::default())
            .await
            .unwrap_err()
            .errno(),
        libc::EACCES
    );
    let refused = FsError::from(SourceError::LoginRefused("role gone".into()));
    assert_eq!(refused.errno(), libc::EACCES);
    w.source.fail(SourceError::Unavailable("down".into()));
    let other = world(&["x=secret/api#token"]);
    other.source.fail(SourceError::Unavailable("down".into()));
    let x = other.fs.spec.child(InodeNo::ROOT, "x").unwrap().ino;
    assert_eq!(
        other
            .fs
            .getattr(x, Caller::default())
            .await
            .unwrap_err()
            .errno(),
        libc::EIO
    );
}

fn template(name: &str, text: &str) -> crate::spec::SecretEntry {
    crate::spec::template_entry(name, text).unwrap()
}

async fn file(w: &World, name: &str) -> Result<Attr, FsError> {
    w.fs.lookup(InodeNo::ROOT, name, Caller::default()).await
}

async fn text(w: &World, name: &str) -> String {
    let attr = file(w, name).await.unwrap();
    let fh = w.fs.open(attr.ino, false, Caller::default()).await.unwrap();
    let bytes = read_all(&w.fs, attr.ino, fh).await;
    w.fs.release(fh);
    assert_eq!(
        attr.size,
        bytes.len() as u64,
        "stat shows the rendered size"
    );
    String::from_utf8(bytes).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_template_over_two_secrets_renders_lazily_and_follows_either_rotation() {
    let w = world_of(
        vec![
            template(
                "conn",
                "{{ secret('secret/db').user }}:{{ secret('secret/db').password }}/{{ secret('secret/api').token }}",
            ),
            parse_secret_arg("pw=secret/db#password").unwrap(),
        ],
        Consistency::Strict,
    );
    assert_eq!(w.source.reads(), 0, "publishing reads nothing");
    assert_eq!(text(&w, "conn").await, "app:pw-1/t-1");
    // The plain entry on the same path shares the cached read.
    assert_eq!(text(&w, "pw").await, "pw-1");
    assert_eq!(w.source.reads(), 2, "one read per secret");
    w.source.put("secret/api", &[("token", "t-2-longer")]);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(text(&w, "conn").await, "app:pw-1/t-2-longer");
    let conn = file(&w, "conn").await.unwrap().ino;
    assert!(
        w.invalidated.lock().contains(&conn),
        "the template's inode is invalidated when a secret it reads changes"
    );
    w.source
        .put("secret/db", &[("user", "app"), ("password", "pw-2")]);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(text(&w, "conn").await, "app:pw-2/t-2-longer");
}

#[tokio::test(start_paused = true)]
async fn one_dynamic_secret_read_twice_in_a_template_is_one_lease() {
    let w = world_of(
        vec![template(
            "creds",
            "{{ secret('database/creds/app').username }} {{ secret('database/creds/app').password }}",
        )],
        Consistency::Strict,
    );
    w.source.put_unversioned(
        "database/creds/app",
        &[("username", "u-1"), ("password", "p-1")],
    );
    w.source.set_lease(Some(Duration::from_secs(60)), None);
    assert_eq!(text(&w, "creds").await, "u-1 p-1");
    assert_eq!(
        w.source.reads(),
        1,
        "one read, one lease, both fields from it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_missing_field_or_secret_is_enoent_naming_it_and_an_unchanged_rendering_is_reused() {
    let w = world_of(
        vec![
            template("typo", "{{ secret('secret/db').pasword }}"),
            template("gone", "{{ secret('secret/nope').x }}"),
            template("ok", "{{ secret('secret/db').user }}"),
        ],
        Consistency::Cached,
    );
    let err = file(&w, "typo").await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT);
    assert!(
        err.to_string().contains("\"pasword\" of secret/db"),
        "{err}"
    );
    let err = file(&w, "gone").await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT);
    assert!(err.to_string().contains("secret/nope"), "{err}");
    let first = file(&w, "ok").await.unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    let again = file(&w, "ok").await.unwrap();
    assert_eq!(first.mtime, again.mtime, "nothing changed, same rendering");
    assert_eq!(
        again.ttl,
        Duration::from_secs(20),
        "a cached template's timeout is its secrets' remaining freshness"
    );
}

#[tokio::test(start_paused = true)]
async fn check_all_asks_vault_only_once_freshness_runs_out_and_swaps_changes() {
    let w = world(&SPEC);
    let first = w.fs.check_all().await.unwrap();
    let reads = w.source.reads();
    assert_eq!(reads, 2, "one read per Vault path, not per file");
    assert_eq!(first, Duration::from_secs(30));
    tokio::time::advance(Duration::from_secs(10)).await;
    let left = w.fs.check_all().await.unwrap();
    assert_eq!(left, Duration::from_secs(20));
    assert_eq!(
        w.source.reads() + w.source.version_checks(),
        reads,
        "fresh: nothing asked"
    );
    w.source.put("secret/api", &[("token", "t-2")]);
    tokio::time::advance(left).await;
    w.fs.check_all().await.unwrap();
    let api = w.fs.child_ino(InodeNo::ROOT, "api").unwrap();
    assert_eq!(
        *w.invalidated.lock(),
        vec![api],
        "the changed file alone is swapped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_template_recovers_once_a_secret_it_no_longer_reads_is_gone() {
    let w = world_of(
        vec![template(
            "pointer",
            "{{ secret(secret('secret/cfg').target).token }}",
        )],
        Consistency::Strict,
    );
    w.source.put("secret/cfg", &[("target", "secret/old")]);
    let err = file(&w, "pointer").await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT, "{err}");
    // The pointer is fixed: the secret the last rendering asked for is still missing, and
    // must not keep the file failing.
    w.source.put("secret/cfg", &[("target", "secret/api")]);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(text(&w, "pointer").await, "t-1");
}

/// A certificate entry over the mock: the four files of `tls`, with the fields put
/// at the certificate's path.
fn certificate_world() -> (World, crate::spec::SecretPath) {
    let entries = crate::spec::parse_spec_document(
        "- {name: tls, pki: {path: pki/issue/web, commonName: web.example.com}}\n",
    )
    .unwrap();
    let path = entries[0].secret().unwrap().0.clone();
    let w = world_of(entries, Consistency::Strict);
    (w, path)
}

fn put_pair(w: &World, path: &crate::spec::SecretPath, n: u32) {
    let (key, crt) = (format!("key-{n}"), format!("crt-{n}"));
    w.source.put_unversioned(
        path.as_str(),
        &[
            ("tls.key", key.as_str()),
            ("tls.crt", crt.as_str()),
            ("ca.crt", "ca"),
            ("bundle.pem", "bundle"),
        ],
    );
}

#[tokio::test(start_paused = true)]
async fn in_strict_mode_a_process_reading_key_then_certificate_gets_one_pair_across_a_renewal() {
    let (w, path) = certificate_world();
    // Held like a certificate: a 15 s lease that cannot be extended, so a new value is read
    // two thirds in (at 10 s); a round of opens lasts at most a third of it (5 s).
    w.source
        .set_lease(Some(Duration::from_secs(15)), Some(Duration::from_secs(15)));
    put_pair(&w, &path, 1);
    let dir =
        w.fs.lookup(InodeNo::ROOT, "tls", Caller::default())
            .await
            .unwrap()
            .ino;
    let file = |name: &'static str| {
        let fs = &w.fs;
        async move { fs.lookup(dir, name, Caller::default()).await.unwrap().ino }
    };
    let (key, crt) = (file("tls.key").await, file("tls.crt").await);
    // Real processes: rounds are per process, found in /proc.
    let reader = Caller {
        pid: std::process::id(),
        ..Caller::default()
    };
    let other = Caller {
        pid: 1,
        ..Caller::default()
    };
    let open_read = |ino: InodeNo, caller: Caller| {
        let fs = &w.fs;
        async move {
            let fh = fs.open(ino, false, caller).await.unwrap();
            let bytes = read_all(fs, ino, fh).await;
            fs.release(fh);
            String::from_utf8(bytes).unwrap()
        }
    };
    tokio::time::advance(Duration::from_secs(8)).await;
    assert_eq!(open_read(key, reader).await, "key-1");
    put_pair(&w, &path, 2);
    // The renewal, between the reader's two opens.
    tokio::time::advance(Duration::from_secs(3)).await;
    tokio::task::yield_now().await;
    assert_eq!(
        open_read(crt, other).await,
        "crt-2",
        "another process: the new pair"
    );
    assert_eq!(
        open_read(crt, reader).await,
        "crt-1",
        "the reader finishes its pair"
    );
    // Its next round starts with the new pair.
    assert_eq!(open_read(key, reader).await, "key-2");
    assert_eq!(open_read(crt, reader).await, "crt-2");
}
