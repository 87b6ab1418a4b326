//! The SQL stores' schema migrations, built into the binary.
//!
//! `sqlx::migrate!` would embed the same files, but it is one of sqlx's
//! macros, and those build sqlx's drivers (SQLite's C included) a second time
//! for the compiler: about half a minute of every clean build. The
//! `migrations_match_their_folders` test keeps these lists and the folders equal.

use std::sync::LazyLock;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// One migration file: its version and description as sqlx reads them from
/// `<version>_<description>.sql` (underscores become spaces), and its SQL.
type File = (i64, &'static str, &'static str);

const SQLITE: &[File] = &[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "counters markers",
        include_str!("../../migrations/sqlite/0002_counters_markers.sql"),
    ),
    (
        3,
        "delivery usage",
        include_str!("../../migrations/sqlite/0003_delivery_usage.sql"),
    ),
    (
        4,
        "counters keep until",
        include_str!("../../migrations/sqlite/0004_counters_keep_until.sql"),
    ),
    (
        5,
        "usage stripes",
        include_str!("../../migrations/sqlite/0005_usage_stripes.sql"),
    ),
    (
        6,
        "send options",
        include_str!("../../migrations/sqlite/0006_send_options.sql"),
    ),
];

const POSTGRES: &[File] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "counters markers",
        include_str!("../../migrations/postgres/0002_counters_markers.sql"),
    ),
    (
        3,
        "delivery usage",
        include_str!("../../migrations/postgres/0003_delivery_usage.sql"),
    ),
    (
        4,
        "counters keep until",
        include_str!("../../migrations/postgres/0004_counters_keep_until.sql"),
    ),
    (
        5,
        "add counters function",
        include_str!("../../migrations/postgres/0005_add_counters_function.sql"),
    ),
    (
        6,
        "read counters function",
        include_str!("../../migrations/postgres/0006_read_counters_function.sql"),
    ),
    (
        7,
        "usage stripes",
        include_str!("../../migrations/postgres/0007_usage_stripes.sql"),
    ),
    (
        8,
        "send options",
        include_str!("../../migrations/postgres/0008_send_options.sql"),
    ),
];

pub(crate) static SQLITE_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| migrator(SQLITE));
pub(crate) static POSTGRES_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| migrator(POSTGRES));

/// What `sqlx::migrate!` builds from a folder: the checksums (of the files'
/// exact text) are the ones databases migrated by earlier builds recorded.
fn migrator(files: &'static [File]) -> Migrator {
    Migrator::with_migrations(
        files
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    sql.starts_with("-- no-transaction"),
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of `migrations/<folder>` is in `files`, under the version
    /// and description sqlx gives its name, with the same text; and no other.
    fn assert_matches_folder(files: &[File], folder: &str) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(folder);
        let mut on_disk: Vec<(i64, String, String)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| {
                let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()));
                let (version, rest) = name
                    .split_once('_')
                    .unwrap_or_else(|| panic!("{name}: not <version>_<description>.sql"));
                let description = rest
                    .strip_suffix(".sql")
                    .unwrap_or_else(|| panic!("{name}: not a .sql file"))
                    .replace('_', " ");
                let version = version
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: the version is not a number"));
                let sql = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                (version, description, sql)
            })
            .collect();
        on_disk.sort();
        let built: Vec<(i64, String, String)> = files
            .iter()
            .map(|&(v, d, sql)| (v, d.to_owned(), sql.to_owned()))
            .collect();
        assert_eq!(
            built, on_disk,
            "src/store/migrations.rs must list migrations/{folder}"
        );
    }

    #[test]
    fn migrations_match_their_folders() {
        assert_matches_folder(SQLITE, "sqlite");
        assert_matches_folder(POSTGRES, "postgres");
    }

    #[test]
    fn checksums_are_those_sqlx_migrate_recorded() {
        // `sqlx::migrate!` recorded SHA-384 of each file's text; another
        // checksum would make every database it migrated refuse to start.
        use sha2::{Digest, Sha384};
        for files in [SQLITE, POSTGRES] {
            let migrator = migrator(files);
            assert_eq!(migrator.migrations.len(), files.len());
            for (migration, &(version, _, sql)) in migrator.migrations.iter().zip(files) {
                assert_eq!(migration.version, version);
                assert_eq!(migration.checksum.as_ref(), Sha384::digest(sql).as_slice());
                assert!(!migration.no_tx);
            }
        }
    }
}
