//! The backup side: `pg_dump --format=custom` in an exported snapshot, with the rows
//! counted in that snapshot, and the cluster's roles from `pg_dumpall --roles-only`.

use futures::FutureExt;
use futures::future::BoxFuture;

use super::{BASE, GLOBALS, PARTS, Postgres, database_counts};
use crate::datastore::{DumpError, DumpOutcome, DumpStream, Dumper, Part, describe_status};
use ferry_core::manifest::Source;

impl Postgres {
    async fn dump_main(&self) -> Result<DumpStream, DumpError> {
        let db = self
            .cfg
            .database
            .clone()
            .ok_or_else(|| DumpError::Source("no database configured to back up".into()))?;
        let client = self
            .connect(&db)
            .await
            .map_err(|e| DumpError::Source(e.to_string()))?;
        let q = |e: tokio_postgres::Error| {
            DumpError::Source(format!("PostgreSQL database {db:?}: {e}"))
        };
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(q)?;
        let snapshot: String = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(q)?
            .get(0);
        let server_version: String = client
            .query_one("SELECT current_setting('server_version')", &[])
            .await
            .map_err(q)?
            .get(0);

        let mut cmd = self.command("pg_dump");
        cmd.args(["--format=custom", "--compress=0", "--snapshot"])
            .arg(&snapshot)
            .arg("--dbname")
            .arg(&db);
        let (mut child, stdout, tail) =
            self.spawn(cmd, "pg_dump", false)
                .map_err(|source| DumpError::Spawn {
                    tool: "pg_dump".into(),
                    source,
                })?;
        // Counted in the exported snapshot while pg_dump streams; the transaction stays
        // open until pg_dump has finished.
        let counting = tokio::spawn(async move {
            let counts = database_counts(&client).await;
            (client, counts)
        });
        let tool_version = self.tools.version("pg_dump");
        let finish = async move {
            let status = child
                .wait()
                .await
                .map_err(|e| DumpError::Source(format!("waiting for pg_dump: {e}")))?;
            tail.wait();
            let (client, counts) = counting
                .await
                .map_err(|e| DumpError::Source(format!("counting rows: {e}")))?;
            let _ = client.batch_execute("COMMIT").await;
            if !status.success() {
                return Err(DumpError::Tool {
                    tool: "pg_dump".into(),
                    status: describe_status(status),
                    stderr: tail.text(),
                });
            }
            let counts =
                counts.map_err(|e| DumpError::Source(format!("counting rows in {db:?}: {e}")))?;
            let summary = format!(
                "{} tables, {} rows",
                counts.rows.len(),
                counts.rows.values().sum::<i64>()
            );
            Ok(DumpOutcome {
                source: Source {
                    tool: "pg_dump".into(),
                    tool_version,
                    server_version,
                },
                counts: counts.to_json(),
                summary,
            })
        };
        Ok(DumpStream {
            reader: Box::new(stdout),
            finish: finish.boxed(),
        })
    }

    async fn dump_globals(&self) -> Result<DumpStream, DumpError> {
        let client = self
            .connect(&self.cfg.maintenance_database)
            .await
            .map_err(|e| DumpError::Source(e.to_string()))?;
        let row = client
            .query_one(
                "SELECT current_setting('server_version'), \
                 (SELECT count(*) FROM pg_roles WHERE rolname !~ '^pg_')",
                &[],
            )
            .await
            .map_err(|e| DumpError::Source(e.to_string()))?;
        let server_version: String = row.get(0);
        let roles: i64 = row.get(1);
        let mut cmd = self.command("pg_dumpall");
        cmd.arg("--roles-only")
            .arg("--database")
            .arg(&self.cfg.maintenance_database);
        if !self.cfg.role_passwords {
            cmd.arg("--no-role-passwords");
        }
        let (mut child, stdout, tail) =
            self.spawn(cmd, "pg_dumpall", false)
                .map_err(|source| DumpError::Spawn {
                    tool: "pg_dumpall".into(),
                    source,
                })?;
        let tool_version = self.tools.version("pg_dumpall");
        let finish = async move {
            let status = child
                .wait()
                .await
                .map_err(|e| DumpError::Source(format!("waiting for pg_dumpall: {e}")))?;
            tail.wait();
            if !status.success() {
                return Err(DumpError::Tool {
                    tool: "pg_dumpall".into(),
                    status: describe_status(status),
                    stderr: tail.text(),
                });
            }
            Ok(DumpOutcome {
                source: Source {
                    tool: "pg_dumpall".into(),
                    tool_version,
                    server_version,
                },
                counts: serde_json::json!({ "roles": roles }),
                summary: format!("{roles} roles"),
            })
        };
        Ok(DumpStream {
            reader: Box::new(stdout),
            finish: finish.boxed(),
        })
    }
}

impl Dumper for Postgres {
    fn parts(&self) -> &'static [Part] {
        if self.physical() { &[BASE] } else { PARTS }
    }

    fn dump<'a>(&'a self, part: &'a Part) -> BoxFuture<'a, Result<DumpStream, DumpError>> {
        async move {
            if self.physical() {
                self.dump_base().await
            } else if *part == GLOBALS {
                self.dump_globals().await
            } else {
                self.dump_main().await
            }
        }
        .boxed()
    }
}
