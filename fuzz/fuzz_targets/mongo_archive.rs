//! The mongodump archive reader (`agent/src/datastore/mongodb/archive.rs`) on arbitrary
//! bytes. Properties:
//!
//! - it returns an error of kind `InvalidData` or `UnexpectedEof`, or a parse; never a
//!   panic, and never an allocation larger than the input plus a fixed margin (the length
//!   fields are untrusted);
//! - every document it yields is well-formed BSON of at most `MAX_DOCUMENT_BYTES`, and
//!   decoding it (as a restore does for oplog entries) and the prelude's metadata
//!   (`parse_metadata`) fail cleanly or succeed;
//! - an archive read to its end round-trips: written again by Ferry's `ArchiveWriter` (one
//!   segment per document), it reads back to the same header, prelude and items.
#![no_main]

use std::io;

use ferry_agent::datastore::mongodb::archive::{
    ArchiveReader, ArchiveWriter, CollectionMetadata, Header, Item, MAX_DOCUMENT_BYTES,
};
use ferry_agent::datastore::mongodb::parse_metadata;
use ferry_fuzz::Counting;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

/// Largest allocation allowed beyond the input's own size, bytes: the reader's initial
/// block capacity (64 KiB) and the bookkeeping of maps and vectors, with margin.
const ALLOCATION_MARGIN: usize = 1024 * 1024;

#[derive(Debug, PartialEq)]
struct Parsed {
    header: Header,
    collections: Vec<CollectionMetadata>,
    items: Vec<Item>,
}

fn parse(data: &[u8]) -> io::Result<Parsed> {
    let mut reader = ArchiveReader::new(data)?;
    let mut items = Vec::new();
    while let Some(item) = reader.next_item()? {
        items.push(item);
    }
    Ok(Parsed {
        header: reader.header.clone(),
        collections: reader.collections.clone(),
        items,
    })
}

fn write(p: &Parsed) -> Vec<u8> {
    let mut w = ArchiveWriter::new(Vec::new(), &p.header, &p.collections).expect("to memory");
    for item in &p.items {
        match item {
            Item::Document { ns, bytes } => w
                .write_segment(&ns.0, &ns.1, [bytes.as_slice()])
                .expect("to memory"),
            Item::End(ns) => w.end_namespace(&ns.0, &ns.1).expect("to memory"),
        }
    }
    w.finish().expect("to memory")
}

fuzz_target!(|data: &[u8]| {
    Counting::reset();
    let parsed = parse(data);
    let largest = Counting::largest();
    assert!(
        largest <= data.len() * 2 + ALLOCATION_MARGIN,
        "reading {} bytes allocated {largest} bytes at once",
        data.len()
    );
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ),
                "unexpected error kind {:?}: {e}",
                e.kind()
            );
            return;
        }
    };
    for c in &parsed.collections {
        let _ = parse_metadata(c);
    }
    for item in &parsed.items {
        if let Item::Document { bytes, .. } = item {
            assert!(bytes.len() <= MAX_DOCUMENT_BYTES);
            bson::RawDocument::from_bytes(bytes).expect("the reader yields well-formed BSON");
            let _ = bson::Document::from_reader(bytes.as_slice());
        }
    }
    let rewritten = write(&parsed);
    let again = parse(&rewritten)
        .unwrap_or_else(|e| panic!("an archive rewritten by ArchiveWriter is refused: {e}"));
    assert_eq!(again, parsed, "the archive does not round-trip");
});
