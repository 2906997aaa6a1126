//! The configuration's tests: defaults, precedence, each key's checks and
//! the errors that name the key and its source.

use super::*;
use std::path::Path;

use fanout_aws::AudienceIndex;
use figment::Jail;

const QUEUE: &str = "http://127.0.0.1:5320/000000000000/jobs";

fn load_err(jail: &mut Jail, file: Option<&str>) -> String {
    let path = file.map(|f| jail.directory().join(f));
    Config::load(path.as_deref()).unwrap_err().to_string()
}

/// Sets the jobs queue, which every load needs, and then `env`.
fn with_queue(jail: &mut Jail, env: &[(&str, &str)]) {
    jail.set_env("FANOUT_QUEUE_URL", QUEUE);
    for (var, value) in env {
        jail.set_env(var, value);
    }
}

/// The configuration the jobs queue and `env` load to.
fn loaded(env: &[(&str, &str)]) -> Config {
    let mut config = None;
    Jail::expect_with(|jail| {
        with_queue(jail, env);
        config = Some(Config::load(None).unwrap_or_else(|e| panic!("{env:?} loads: {e}")));
        Ok(())
    });
    config.expect("the jail ran")
}

/// The error the jobs queue and `env` are refused with.
fn refused(env: &[(&str, &str)]) -> String {
    refused_in(
        |jail| {
            with_queue(jail, env);
            Ok(())
        },
        None,
    )
}

/// The error a load reading `file` (if any) is refused with, in a jail
/// `prepare` has set up.
fn refused_in(
    prepare: impl FnOnce(&mut Jail) -> figment::error::Result<()>,
    file: Option<&str>,
) -> String {
    let mut err = String::new();
    Jail::expect_with(|jail| {
        prepare(jail)?;
        err = load_err(jail, file);
        Ok(())
    });
    err
}

#[test]
fn defaults_are_documented_and_valid() {
    let config = loaded(&[]);
    assert_eq!(config.key_attribute, "connectionId");
    assert_eq!(config.channel_attribute, "channel");
    assert_eq!(config.rate_per_second, Some(1000));
    assert_eq!(config.rate_burst, 50);
    assert_eq!(config.max_in_flight, 256);
    assert_eq!(config.max_concurrent_jobs, 64);
    assert_eq!(config.shutdown_grace, Duration::from_secs(25));
    assert_eq!(config.receive_wait, Duration::from_secs(20));
    assert_eq!(config.dead_letter_queue_url, None);
    // Every key is written in the defaults file, set or commented.
    // The defaults file documents exactly the declared keys, each
    // set or commented out, none stale.
    let documented: std::collections::BTreeSet<&str> = DEFAULTS
        .lines()
        .filter_map(|line| {
            let line = line.strip_prefix("# ").unwrap_or(line);
            let (key, _) = line.split_once(" = ")?;
            key.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_')
                .then_some(key)
        })
        .collect();
    let declared: std::collections::BTreeSet<&str> = keys().iter().copied().collect();
    assert_eq!(documented, declared);
}

#[test]
fn the_configuration_doc_has_a_row_per_key_with_its_default() {
    const DOC: &str = include_str!("../../../../docs/configuration.md");
    let defaults: std::collections::BTreeMap<String, figment::value::Value> =
        Figment::from(Toml::string(DEFAULTS))
            .extract()
            .expect("the defaults parse");
    for key in keys() {
        // A row names one variable, or a few that go together.
        let variable = format!("`{}`", env_name(key));
        let row =
            DOC.lines()
                .find(|line| {
                    line.starts_with("| `FANOUT_")
                        && line.split('|').nth(1).is_some_and(|names| {
                            names.split(',').any(|name| name.trim() == variable)
                        })
                })
                .unwrap_or_else(|| panic!("docs/configuration.md has no row for {variable}"));
        let default_cell = row.trim_end_matches('|').rsplit('|').next().unwrap();
        if let Some(value) = defaults.get(*key) {
            let text = match value {
                figment::value::Value::String(_, s) => s.clone(),
                other => other
                    .to_num()
                    .and_then(|n| n.to_i128())
                    .map(|n| n.to_string())
                    .or_else(|| other.to_bool().map(|b| b.to_string()))
                    .unwrap_or_default(),
            };
            assert!(
                default_cell.contains(&text),
                "docs/configuration.md gives {key}'s default as {default_cell:?}; config/default.toml has {text:?}"
            );
        }
    }
}

#[test]
fn the_environment_overrides_the_file_which_overrides_defaults() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "fanout.toml",
            &format!("queue_url = \"{QUEUE}\"\nrate_per_second = 200\nmax_in_flight = 8\n"),
        )?;
        jail.set_env("FANOUT_MAX_IN_FLIGHT", "16");
        jail.set_env("FANOUT_TABLE", "connections");
        jail.set_env("FANOUT_GATEWAY_ENDPOINT", "http://127.0.0.1:9/dev");
        jail.set_env("FANOUT_SHUTDOWN_GRACE", "10s");
        // The scripts' own variables, under the reserved prefix, are ignored.
        jail.set_env("FANOUT_DEV_EMU_SQS_PORT", "5330");
        let path = jail.directory().join("fanout.toml");
        let config = Config::load(Some(&path)).expect("loads");
        assert_eq!(config.rate_per_second, Some(200));
        assert_eq!(config.rate_burst, 50);
        assert_eq!(config.max_in_flight, 16);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
        let targets = config.worker_targets().expect("targets");
        assert_eq!(targets.table, "connections");
        Ok(())
    });
}

#[test]
fn audience_indexes_come_as_text_or_a_table_and_bad_ones_name_the_key() {
    let index = |name: &str, index: &str, attribute: &str| AudienceIndex {
        name: name.into(),
        index: index.into(),
        attribute: attribute.into(),
    };
    Jail::expect_with(|jail| {
        jail.set_env("FANOUT_QUEUE_URL", QUEUE);
        let config = Config::load(None).expect("loads");
        assert!(config.audience_indexes.is_empty());
        assert_eq!(
            config.worker_settings(false).capabilities.audiences,
            Some(vec![])
        );
        jail.set_env(
            "FANOUT_AUDIENCE_INDEXES",
            "user=by-user:userId, tenant=by-tenant:tenantId",
        );
        let config = Config::load(None).expect("loads");
        assert_eq!(
            config.audience_indexes,
            [
                index("user", "by-user", "userId"),
                index("tenant", "by-tenant", "tenantId")
            ]
        );
        assert_eq!(
            config.worker_settings(false).capabilities.audiences,
            Some(vec!["user".to_owned(), "tenant".to_owned()])
        );
        assert!(
            config
                .to_redacted_toml()
                .contains(r#"audience_indexes = "user=by-user:userId,tenant=by-tenant:tenantId""#),
            "check-config shows it as it is written"
        );
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("FANOUT_QUEUE_URL", QUEUE);
        jail.create_file(
            "fanout.toml",
            "[audience_indexes]\nuser = \"by-user:userId\"\n",
        )?;
        let path = jail.directory().join("fanout.toml");
        let config = Config::load(Some(&path)).expect("loads");
        assert_eq!(
            config.audience_indexes,
            [index("user", "by-user", "userId")]
        );
        Ok(())
    });
    for (value, says) in [
        ("user", "is not name=index:attribute"),
        ("user=by-user", "is not name=index:attribute"),
        ("user=by-user:", "empty part"),
        ("=by-user:userId", "empty part"),
        ("user=by-user:userId,", "is not name=index:attribute"),
        ("user=a:b,user=c:d", "named twice"),
    ] {
        let err = refused(&[("FANOUT_AUDIENCE_INDEXES", value)]);
        assert!(err.contains("audience_indexes"), "{value}: {err}");
        assert!(err.contains("FANOUT_AUDIENCE_INDEXES"), "{value}: {err}");
        assert!(err.contains(says), "{value}: {err}");
    }
}

#[test]
fn a_missing_queue_url_names_the_variable() {
    let err = refused_in(|_| Ok(()), None);
    assert!(err.contains("`queue_url` is required"), "{err}");
    assert!(err.contains("FANOUT_QUEUE_URL"), "{err}");
}

#[test]
fn report_destinations_are_optional_and_checked_and_progress_has_a_floor() {
    Jail::expect_with(|jail| {
        jail.set_env("FANOUT_QUEUE_URL", QUEUE);
        let config = Config::load(None).expect("loads");
        assert_eq!(
            (config.report_queue_url, config.report_topic_arn),
            (None, None)
        );
        assert_eq!(config.progress_interval, Duration::from_secs(10));
        jail.set_env(
            "FANOUT_REPORT_QUEUE_URL",
            "http://127.0.0.1:5320/000000000000/reports",
        );
        jail.set_env(
            "FANOUT_REPORT_TOPIC_ARN",
            "arn:aws:sns:eu-west-1:123456789012:reports",
        );
        jail.set_env("FANOUT_PROGRESS_INTERVAL", "5s");
        let config = Config::load(None).expect("loads");
        assert_eq!(
            config.engine_settings().progress_interval,
            Duration::from_secs(5)
        );
        assert!(config.report_queue_url.unwrap().ends_with("/reports"));
        assert!(config.report_topic_arn.unwrap().ends_with(":reports"));
        jail.set_env("FANOUT_REPORT_TOPIC_ARN", "reports");
        let err = load_err(jail, None);
        assert!(err.contains("FANOUT_REPORT_TOPIC_ARN"), "{err}");
        assert!(err.contains("not an SNS topic ARN"), "{err}");
        jail.set_env(
            "FANOUT_REPORT_TOPIC_ARN",
            "arn:aws:sqs:eu-west-1:123456789012:q",
        );
        assert!(load_err(jail, None).contains("not an SNS topic ARN"));
        jail.set_env(
            "FANOUT_REPORT_TOPIC_ARN",
            "arn:aws:sns:eu-west-1:123456789012:reports",
        );
        jail.set_env("FANOUT_REPORT_QUEUE_URL", "reports");
        assert!(load_err(jail, None).contains("FANOUT_REPORT_QUEUE_URL"));
        jail.set_env(
            "FANOUT_REPORT_QUEUE_URL",
            "http://127.0.0.1:5320/000000000000/reports",
        );
        jail.set_env("FANOUT_PROGRESS_INTERVAL", "0s");
        let err = load_err(jail, None);
        assert!(
            err.contains("FANOUT_PROGRESS_INTERVAL") && err.contains("at least 1s"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn the_worker_needs_a_table_and_an_endpoint() {
    let config = loaded(&[]);
    let err = config.worker_targets().unwrap_err().to_string();
    assert!(err.contains("FANOUT_TABLE"), "{err}");
}

#[test]
fn a_bad_env_value_names_the_variable() {
    let err = refused(&[("FANOUT_RATE_PER_SECOND", "fast")]);
    assert!(err.contains("rate_per_second"), "{err}");
    assert!(err.contains("FANOUT_RATE_PER_SECOND"), "{err}");
}

#[test]
fn an_unknown_file_key_is_refused_with_the_file_named() {
    let err = refused_in(
        |jail| {
            jail.create_file("bad.toml", "rate_per_secnd = 5\n")?;
            with_queue(jail, &[]);
            Ok(())
        },
        Some("bad.toml"),
    );
    assert!(err.contains("rate_per_secnd"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn a_missing_config_file_is_an_error() {
    let err = refused_in(|_| Ok(()), Some("nope.toml"));
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn the_fleet_keys_go_together_and_name_what_is_missing() {
    let fleet = [
        ("FANOUT_FLEET_RATE_PER_SECOND", "2000"),
        ("FANOUT_FLEET_TABLE", "fleet"),
        ("FANOUT_FLEET_FALLBACK_RATE", "500"),
        ("FANOUT_RATE_PER_SECOND", "2000"),
    ];
    let with = |skip: &str, extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
        fleet
            .iter()
            .chain(extra)
            .filter(|(var, _)| *var != skip)
            .copied()
            .collect()
    };
    let config = loaded(&with("", &[]));
    let (table, settings) = config.fleet_settings("t-1".into()).expect("a fleet");
    assert_eq!(table, "fleet");
    assert_eq!((settings.rate.get(), settings.fallback.get()), (2000, 500));
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
    // (a key left out, keys set differently, what the error says)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("FANOUT_FLEET_TABLE", &[], "FANOUT_FLEET_TABLE"),
        (
            "",
            &[("FANOUT_FLEET_FALLBACK_RATE", "3000")],
            "outside 1..=2000",
        ),
        (
            "",
            &[("FANOUT_RATE_PER_SECOND", "0")],
            "must be more than 0",
        ),
        (
            "FANOUT_FLEET_RATE_PER_SECOND",
            &[],
            "needs fleet_rate_per_second",
        ),
    ];
    for (skip, extra, expected) in cases {
        let err = refused(&with(skip, extra));
        assert!(
            err.contains(expected),
            "without {skip}, with {extra:?}: {err}"
        );
    }
    // A low ceiling is allowed, with a warning.
    let config = loaded(&with("", &[("FANOUT_RATE_PER_SECOND", "1000")]));
    let warnings = config.warnings();
    assert!(
        warnings.len() == 1 && warnings[0].contains("cannot use the whole fleet rate"),
        "{warnings:?}"
    );
    assert!(
        loaded(&[]).fleet_settings("t".into()).is_none(),
        "no fleet by default"
    );
}

#[test]
fn cross_field_checks_name_the_key_and_source() {
    let cases: &[(&str, &str, &str)] = &[
        ("FANOUT_HEARTBEAT_INTERVAL", "60s", "heartbeat_interval"),
        ("FANOUT_RECEIVE_WAIT", "21s", "receive_wait"),
        ("FANOUT_PAGE_SIZE", "5000", "page_size"),
        ("FANOUT_MAX_IN_FLIGHT", "0", "max_in_flight"),
        ("FANOUT_RATE_BURST", "5000", "rate_burst"),
        (
            "FANOUT_GATEWAY_ENDPOINT",
            "https://abc.execute-api.eu-west-1.amazonaws.com",
            "has no stage",
        ),
        ("FANOUT_GATEWAY_ENDPOINT", "abc", "not a URL"),
        (
            "FANOUT_DEAD_LETTER_QUEUE_URL",
            "ftp://x/y",
            "not an http(s) URL",
        ),
        ("FANOUT_SEND_RETRY_BASE", "1m", "send_retry_base"),
        ("FANOUT_TABLE", " ", "must not be empty"),
        ("FANOUT_METRICS_LISTEN", "localhost", "metrics_listen"),
        ("FANOUT_HEALTH_MAX_AGE", "5s", "health_max_age"),
        ("FANOUT_SEND_PATH", "fast", "send_path"),
    ];
    for (var, value, expected) in cases {
        let err = refused(&[(var, value)]);
        assert!(err.contains(expected), "{var}={value}: {err}");
        assert!(err.contains(var), "{var}={value}: source not named: {err}");
    }
}

#[test]
fn stage_less_endpoints_outside_execute_api_are_accepted() {
    for endpoint in ["http://127.0.0.1:3001", "https://ws.example.com"] {
        let config = loaded(&[("FANOUT_GATEWAY_ENDPOINT", endpoint)]);
        assert_eq!(config.gateway_endpoint.as_deref(), Some(endpoint));
    }
}

#[test]
fn plain_http_beyond_loopback_needs_its_own_key() {
    Jail::expect_with(|jail| {
        jail.set_env("FANOUT_QUEUE_URL", QUEUE);
        jail.set_env("FANOUT_GATEWAY_ENDPOINT", "http://ws.internal:8080/prod");
        let err = load_err(jail, None);
        assert!(err.contains("config key `gateway_endpoint`"), "{err}");
        assert!(err.contains("FANOUT_GATEWAY_ENDPOINT"), "{err}");
        assert!(err.contains("FANOUT_GATEWAY_ALLOW_PLAIN_HTTP"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        jail.set_env("FANOUT_GATEWAY_ALLOW_PLAIN_HTTP", "true");
        jail.set_env("FANOUT_TABLE", "connections");
        let config = Config::load(None).expect("allowed");
        assert!(config.gateway_allow_plain_http);
        let targets = config.worker_targets().unwrap();
        assert!(config.send_settings(&targets).trust.allow_plain_http);
        Ok(())
    });
    for local in [
        "http://127.0.0.1:3001",
        "http://[::1]:3001/local",
        "http://localhost:8080/local",
    ] {
        let config = loaded(&[("FANOUT_GATEWAY_ENDPOINT", local)]);
        assert!(!config.gateway_allow_plain_http, "loopback needs no key");
    }
}

#[test]
fn the_gateway_ca_file_is_checked_at_startup_and_reaches_the_gateway_alone() {
    Jail::expect_with(|jail| {
        with_queue(
            jail,
            &[
                ("FANOUT_TABLE", "connections"),
                ("FANOUT_GATEWAY_ENDPOINT", "https://ws.example.com"),
                ("FANOUT_GATEWAY_CA_FILE", "missing.pem"),
            ],
        );
        let err = load_err(jail, None);
        assert!(err.contains("config key `gateway_ca_file`"), "{err}");
        assert!(err.contains("FANOUT_GATEWAY_CA_FILE"), "{err}");
        jail.create_file("not-a-ca.pem", "hello\n")?;
        jail.set_env("FANOUT_GATEWAY_CA_FILE", "not-a-ca.pem");
        let err = load_err(jail, None);
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let ca = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../aws/testdata/unit-test-ca.pem"
        );
        jail.set_env("FANOUT_GATEWAY_CA_FILE", ca);
        let config = Config::load(None).expect("a CA file");
        let targets = config.worker_targets().unwrap();
        let trust = config.send_settings(&targets).trust;
        assert_eq!(trust.ca_file.as_deref(), Some(Path::new(ca)));
        assert!(!trust.allow_plain_http);
        Ok(())
    });
}

#[test]
fn zero_rate_means_no_limit() {
    let config = loaded(&[("FANOUT_RATE_PER_SECOND", "0")]);
    assert_eq!(config.rate_per_second, None);
}

#[test]
fn redaction_hides_credentials_in_urls() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "FANOUT_QUEUE_URL",
            "https://user:secret@sqs.example.com/1/q",
        );
        let config = Config::load(None).expect("loads");
        let shown = config.to_redacted_toml();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("queue_url = \"https://REDACTED@sqs.example.com/1/q\""),
            "{shown}"
        );
        assert!(shown.contains("max_in_flight = 256"), "{shown}");
        Ok(())
    });
}

#[test]
fn an_unset_fleet_fallback_rate_is_derived_and_an_explicit_one_wins() {
    Jail::expect_with(|jail| {
        with_queue(
            jail,
            &[
                ("FANOUT_RATE_PER_SECOND", "2000"),
                ("FANOUT_FLEET_RATE_PER_SECOND", "2000"),
                ("FANOUT_FLEET_TABLE", "fleet"),
            ],
        );
        let config = Config::load(None).expect("loads");
        assert_eq!(config.fleet_fallback_rate, Some(200));
        let (_, settings) = config.fleet_settings("t".into()).expect("a fleet");
        assert_eq!(settings.fallback.get(), 200);
        let shown = config.to_redacted_toml();
        assert!(
            shown.contains("fleet_fallback_rate = 200 # derived: fleet_rate_per_second ÷ 10"),
            "{shown}"
        );
        jail.set_env("FANOUT_FLEET_RATE_PER_SECOND", "5");
        let config = Config::load(None).expect("a tiny fleet rate");
        assert_eq!(config.fleet_fallback_rate, Some(1), "at least 1");
        jail.set_env("FANOUT_FLEET_RATE_PER_SECOND", "2000");
        jail.set_env("FANOUT_FLEET_FALLBACK_RATE", "500");
        let config = Config::load(None).expect("loads");
        assert_eq!(config.fleet_fallback_rate, Some(500));
        assert!(
            !config
                .derived
                .iter()
                .any(|d| d.key == "fleet_fallback_rate")
        );
        assert!(
            config
                .to_redacted_toml()
                .contains("fleet_fallback_rate = 500\n")
        );
        Ok(())
    });
}

#[test]
fn an_unset_heartbeat_is_a_third_of_the_visibility_timeout_and_an_explicit_one_wins() {
    Jail::expect_with(|jail| {
        jail.set_env("FANOUT_QUEUE_URL", QUEUE);
        let config = Config::load(None).expect("the defaults");
        assert_eq!(config.visibility_timeout, Duration::from_secs(60));
        assert_eq!(config.heartbeat_interval, Duration::from_secs(20));
        let keys: Vec<&str> = config.derived.iter().map(|d| d.key).collect();
        assert_eq!(keys, ["rate_burst", "heartbeat_interval"]);
        let shown = config.to_redacted_toml();
        assert!(
            shown.contains("heartbeat_interval = \"20s\" # derived: a third of visibility_timeout"),
            "{shown}"
        );
        assert!(
            shown.contains("rate_burst = 50 # derived: 1% of rate_per_second"),
            "{shown}"
        );
        jail.set_env("FANOUT_VISIBILITY_TIMEOUT", "10s");
        let config = Config::load(None).expect("loads");
        assert_eq!(config.heartbeat_interval, Duration::from_millis(3333));
        assert!(config.heartbeat_interval < config.visibility_timeout);
        jail.set_env("FANOUT_VISIBILITY_TIMEOUT", "2s");
        let config = Config::load(None).expect("the shortest visibility");
        assert_eq!(config.heartbeat_interval, Duration::from_secs(1));
        jail.set_env("FANOUT_VISIBILITY_TIMEOUT", "90s");
        jail.set_env("FANOUT_HEARTBEAT_INTERVAL", "45s");
        jail.set_env("FANOUT_RATE_BURST", "100");
        let config = Config::load(None).expect("loads");
        assert_eq!(config.heartbeat_interval, Duration::from_secs(45));
        assert!(config.derived.is_empty(), "{:?}", config.derived);
        assert!(!config.to_redacted_toml().contains("derived"));
        Ok(())
    });
}

#[test]
fn an_unknown_fanout_variable_is_refused_naming_it_and_the_closest_key() {
    let err = refused(&[("FANOUT_RATE_PER_SECCOND", "500")]);
    assert!(err.contains("FANOUT_RATE_PER_SECCOND"), "{err}");
    assert!(
        err.contains("did you mean FANOUT_RATE_PER_SECOND?"),
        "{err}"
    );
    // The reserved prefix is ignored.
    loaded(&[("FANOUT_DEV_ANYTHING", "x")]);
}

#[test]
fn the_configuration_doc_lists_the_everyday_keys_apart_from_the_advanced_ones() {
    const DOC: &str = include_str!("../../../../docs/configuration.md");
    let section = |title: &str| -> std::collections::BTreeSet<String> {
        DOC.split("\n## ")
            .find(|s| s.starts_with(title))
            .unwrap_or_else(|| panic!("docs/configuration.md has no section {title:?}"))
            .lines()
            .filter(|line| line.starts_with("| `FANOUT_"))
            .flat_map(|line| {
                line.split('|')
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .map(str::to_owned)
            })
            .map(|name| name.trim().trim_matches('`').to_owned())
            .collect()
    };
    let of = |advanced: bool| -> std::collections::BTreeSet<String> {
        KEYS.iter()
            .filter(|key| (key.need == Need::Advanced) == advanced)
            .map(|key| env_name(key.name))
            .collect()
    };
    assert_eq!(section("The settings everyone sets"), of(false));
    assert_eq!(section("Advanced settings"), of(true));
}

#[test]
fn every_setting_the_core_points_at_is_named_by_a_declared_key() {
    use fanout_core::limits::setting::Setting;
    for setting in Setting::ALL {
        let name = setting_name(setting);
        assert!(
            KEYS.iter().any(|key| env_name(key.name) == name),
            "{setting:?} is named {name}, which is no key"
        );
    }
}
