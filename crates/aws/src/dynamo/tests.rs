use super::pages::start_of;
use super::*;

fn key(pairs: &[(&str, &str)]) -> RowKey {
    RowKey(
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), KeyValue::S((*v).to_owned())))
            .collect(),
    )
}

#[test]
fn keys_compare_whatever_their_attribute_order() {
    let a = key(&[("channel", "c"), ("connectionId", "x")]);
    let b = key(&[("connectionId", "x"), ("channel", "c")]);
    assert_ne!(a, b);
    assert_eq!(normalised(&a), normalised(&b));
}

#[test]
fn keys_survive_the_round_trip_through_the_sdk_shape() {
    let key = RowKey(vec![
        ("b".to_owned(), KeyValue::B(vec![0, 255])),
        ("n".to_owned(), KeyValue::N("42".to_owned())),
        ("s".to_owned(), KeyValue::S("x".to_owned())),
    ]);
    assert_eq!(from_item(&to_item(&key)).expect("scalar key"), key);
}

#[test]
fn a_non_scalar_key_attribute_is_refused() {
    let item = Item::from([("k".to_owned(), AttributeValue::Bool(true))]);
    assert!(from_item(&item).is_err());
}

#[test]
fn a_done_cursor_skips_its_segment_and_a_missing_one_starts_over() {
    let cursors = [
        Cursor {
            segment: 0,
            position: None,
        },
        Cursor {
            segment: 1,
            position: Some(Position::Key(key(&[("connectionId", "x")]))),
        },
    ];
    assert_eq!(start_of(Some(&cursors), 0).expect("valid"), None);
    let resumed = start_of(Some(&cursors), 1)
        .expect("valid")
        .expect("not done");
    assert_eq!(
        resumed.expect("a start key")["connectionId"],
        AttributeValue::S("x".to_owned())
    );
    assert_eq!(start_of(Some(&cursors), 2).expect("valid"), Some(None));
    assert_eq!(start_of(None, 0).expect("valid"), Some(None));
}

#[test]
fn a_key_value_taken_from_a_row_is_the_one_copied() {
    use aws_sdk_dynamodb::primitives::Blob;
    for value in [
        AttributeValue::S("x".to_owned()),
        AttributeValue::N("42".to_owned()),
        AttributeValue::B(Blob::new(vec![0, 255])),
        AttributeValue::Bool(true),
    ] {
        assert_eq!(
            super::item::into_key_value(value.clone()),
            key_value(&value)
        );
    }
}
