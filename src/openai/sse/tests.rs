use super::*;

fn events(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut p = SseParser::default();
    let mut out = Vec::new();
    for c in chunks {
        p.feed(c, |e| match e {
            SseEvent::Data(d) => out.push(d.to_vec()),
            SseEvent::TooLarge => out.push(b"<too large>".to_vec()),
        });
    }
    out
}

#[test]
fn splits_events_across_arbitrary_chunk_boundaries() {
    let stream = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n: comment\n\ndata: [DONE]\n\n";
    let whole = events(&[stream]);
    assert_eq!(
        whole,
        [
            b"{\"a\":1}".to_vec(),
            b"{\"b\":2}".to_vec(),
            b"[DONE]".to_vec()
        ]
    );
    for cut in 1..stream.len() {
        assert_eq!(
            events(&[&stream[..cut], &stream[cut..]]),
            whole,
            "cut at {cut}"
        );
    }
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(events(&bytes), whole);
}

#[test]
fn joins_multi_line_data() {
    assert_eq!(events(&[b"data: a\ndata: b\n\n"]), [b"a\nb".to_vec()]);
}

#[test]
fn classifies_responses_api_events() {
    let created = br#"{"type":"response.created","response":{"id":"r","status":"in_progress"}}"#;
    let delta = br#"{"type":"response.output_text.delta","item_id":"m","delta":"Hi"}"#;
    let empty = br#"{"type":"response.output_text.delta","item_id":"m","delta":""}"#;
    let args = br#"{"type":"response.function_call_arguments.delta","delta":"{"}"#;
    let done = br#"{"type":"response.completed","response":{"id":"r","usage":{}}}"#;
    let incomplete = br#"{"type":"response.incomplete","response":{"id":"r"}}"#;
    let failed = br#"{"type":"response.failed","response":{"error":{"message":"x"}}}"#;
    let error = br#"{"type":"error","code":"server_error","message":"x"}"#;
    assert_eq!(classify(created), EventKind::Empty);
    assert_eq!(classify(delta), EventKind::Content);
    assert_eq!(classify(empty), EventKind::Empty);
    assert_eq!(classify(args), EventKind::Content);
    assert_eq!(classify(done), EventKind::Done);
    assert_eq!(classify(incomplete), EventKind::Done);
    assert_eq!(classify(failed), EventKind::Error);
    assert_eq!(classify(error), EventKind::Error);
}

#[test]
fn classifies_vllm_chunks() {
    let role = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
    let token = br#"{"choices":[{"index":0,"delta":{"content":" hi"},"finish_reason":null}]}"#;
    let finish = br#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#;
    let usage = br#"{"choices":[],"usage":{"prompt_tokens":1}}"#;
    let text = br#"{"choices":[{"index":0,"text":" hi","finish_reason":null}]}"#;
    let tool = br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#;
    let reasoning = br#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}"#;
    let error = br#"{"error":{"message":"boom"}}"#;
    assert_eq!(classify(role), EventKind::Empty);
    assert_eq!(classify(token), EventKind::Content);
    assert_eq!(classify(finish), EventKind::Empty);
    assert_eq!(classify(usage), EventKind::Empty);
    assert_eq!(classify(text), EventKind::Content);
    assert_eq!(classify(tool), EventKind::Content);
    assert_eq!(classify(reasoning), EventKind::Content);
    assert_eq!(classify(error), EventKind::Error);
    assert_eq!(classify(b"[DONE]"), EventKind::Done);
    assert_eq!(classify(b"not json"), EventKind::Unparsed);
    for chunk in [
        &role[..],
        token,
        finish,
        usage,
        text,
        tool,
        reasoning,
        error,
    ] {
        let v: serde_json::Value = serde_json::from_slice(chunk).unwrap();
        assert_eq!(
            classify_value(&v),
            classify(chunk),
            "{}",
            String::from_utf8_lossy(chunk)
        );
    }
}

#[test]
fn every_line_ending_the_specification_allows_ends_lines_and_events() {
    for stream in [
        &b"data: a\n\ndata: b\n\n"[..],
        b"data: a\r\rdata: b\r\r",
        b"data: a\r\n\r\ndata: b\r\n\r\n",
        b"data: a\n\r\ndata: b\r\n\n",
        b"data: a\r\ndata: b\n\r",
    ] {
        let got = events(&[stream]);
        let want: Vec<Vec<u8>> = if stream.starts_with(b"data: a\r\ndata") {
            vec![b"a\nb".to_vec()] // one event of two data lines
        } else {
            vec![b"a".to_vec(), b"b".to_vec()]
        };
        assert_eq!(got, want, "{:?}", String::from_utf8_lossy(stream));
        // Byte by byte: a CRLF split between reads is one line ending, not two.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(
            events(&bytes),
            want,
            "{:?}",
            String::from_utf8_lossy(stream)
        );
    }
}

#[test]
fn an_event_over_the_limit_is_skipped_and_parsing_goes_on_in_bounded_memory() {
    let mut p = SseParser::default();
    let mut out = Vec::new();
    let name = |e: SseEvent<'_>| match e {
        SseEvent::Data(d) => String::from_utf8_lossy(d).into_owned(),
        SseEvent::TooLarge => "<too large>".to_owned(),
    };
    p.feed(b"data: first\n\ndata: ", |e| out.push(name(e)));
    // 4 MiB and 512 KiB more of one event, in 64 KiB reads.
    let big = vec![b'x'; 64 << 10];
    let mut peak = 0;
    for _ in 0..(MAX_EVENT_BYTES / big.len() + 8) {
        p.feed(&big, |_| panic!("no event ends inside the big one"));
        peak = peak.max(p.line.capacity() + p.data.capacity());
    }
    p.feed(b"\n\ndata: [DONE]\n\n", |e| out.push(name(e)));
    assert_eq!(out, ["first", "<too large>", "[DONE]"]);
    assert!(peak <= 2 * MAX_EVENT_BYTES, "held {peak} bytes");
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// The specification's reading of a whole stream, written as plainly as possible:
    /// split into lines at CRLF, CR or LF; an empty line ends an event; `data:` values
    /// are joined with LF; events without data are not reported.
    fn reference(stream: &[u8]) -> Vec<Vec<u8>> {
        let mut lines: Vec<&[u8]> = Vec::new();
        let (mut start, mut i) = (0, 0);
        while i < stream.len() {
            match stream[i] {
                b'\r' if stream.get(i + 1) == Some(&b'\n') => {
                    lines.push(&stream[start..i]);
                    i += 2;
                    start = i;
                }
                b'\r' | b'\n' => {
                    lines.push(&stream[start..i]);
                    i += 1;
                    start = i;
                }
                _ => i += 1,
            }
        }
        let (mut out, mut data, mut has) = (Vec::new(), Vec::new(), false);
        for line in lines {
            if line.is_empty() {
                if has && !data.is_empty() {
                    out.push(std::mem::take(&mut data));
                }
                data.clear();
                has = false;
            } else if let Some(v) = line.strip_prefix(b"data:") {
                if has {
                    data.push(b'\n');
                }
                data.extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
                has = true;
            }
        }
        out
    }

    /// Events whose lines end with any of the three line endings, chosen per line.
    fn mixed_stream() -> impl Strategy<Value = Vec<u8>> {
        let ending = prop_oneof![Just(&b"\n"[..]), Just(&b"\r"[..]), Just(&b"\r\n"[..])];
        let line = prop_oneof![
            "data: [a-z{}\":]{0,12}".prop_map(String::into_bytes),
            Just(b"data: [DONE]".to_vec()),
            Just(b"data:".to_vec()),
            Just(b": keep-alive".to_vec()),
            Just(b"event: message".to_vec()),
            Just(Vec::new()),
        ];
        proptest::collection::vec((line, ending), 0..40).prop_map(|v| {
            v.into_iter()
                .flat_map(|(l, e)| l.into_iter().chain(e.iter().copied()))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Mixed line endings, cut into reads anywhere: the same events as the reference.
        #[test]
        fn mixed_line_endings_and_any_chunking_read_as_the_reference_does(
            bytes in mixed_stream(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let chunks = cut(&bytes, &cuts);
            prop_assert_eq!(events(&chunks), reference(&bytes));
        }
    }

    /// `bytes` cut into reads at the given points.
    fn cut<'a>(bytes: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut last = 0;
        for p in points {
            chunks.push(&bytes[last..p]);
            last = p;
        }
        chunks.push(&bytes[last..]);
        chunks
    }

    /// Bytes that look like SSE often enough to matter: data lines, blank lines, CRs,
    /// JSON fragments and noise.
    fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"data: ".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"[DONE]".to_vec()),
            Just(br#"{"choices":[{"delta":{"content":"x"}}]}"#.to_vec()),
            Just(br#"{"error":{"message":"e"}}"#.to_vec()),
            Just(b": comment".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..16),
        ];
        proptest::collection::vec(piece, 0..64).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// No input panics, every event classifies, and how the bytes are cut into reads
        /// never changes the events.
        #[test]
        fn chunking_never_changes_the_events(
            bytes in sse_bytes(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let whole = events(&[&bytes]);
            let chunks = cut(&bytes, &cuts);
            prop_assert_eq!(events(&chunks), whole.clone());
            for e in &whole {
                let _ = classify(e);
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(e) {
                    prop_assert_eq!(classify_value(&v), classify(e));
                }
            }
        }
    }
}

#[test]
fn reads_the_usage_an_event_reports() {
    let chat =
        br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
    assert_eq!(measure(chat), (EventKind::Empty, Some((12, 30))));
    // vLLM's continuous usage stats: a content chunk carrying the running usage.
    let running = br#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
    assert_eq!(measure(running), (EventKind::Content, Some((12, 3))));
    let responses = br#"{"type":"response.completed","response":{"id":"r","output":[{"content":[{"text":"hi"}]}],"usage":{"input_tokens":9,"output_tokens":4,"output_tokens_details":{"reasoning_tokens":0}}}}"#;
    assert_eq!(measure(responses), (EventKind::Done, Some((9, 4))));
    // No usage, a null one, a partial one: nothing read.
    for none in [
        &br#"{"choices":[{"index":0,"delta":{"content":"a"}}]}"#[..],
        br#"{"choices":[],"usage":null}"#,
        br#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
        br#"{"type":"response.created","response":{"id":"r","usage":null}}"#,
        b"[DONE]",
    ] {
        assert_eq!(measure(none).1, None, "{}", String::from_utf8_lossy(none));
    }
}

#[test]
fn an_odd_usage_does_not_hide_the_events_tokens() {
    for odd in [
        &br#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":"lots"}"#[..],
        br#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":-1,"completion_tokens":2.5}}"#,
        br#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":"3","completion_tokens":4}}"#,
    ] {
        assert_eq!(measure(odd), (EventKind::Content, None));
    }
    let odd_response = br#"{"type":"response.completed","response":"done"}"#;
    assert_eq!(measure(odd_response), (EventKind::Done, None));
}
