//! Text folding for matching, and the script counts language detection uses.
//!
//! Folding is hand-written rather than Unicode NFKC (the `unicode-normalization` crate) because
//! triage needs only three things, on the hot path, in one pass over ~1 KB: full-width ASCII
//! (U+FF01–FF5E) and the ideographic space to their half-width forms, case folding of alphabetic
//! scripts, and whitespace runs collapsed to one space. NFKC would also rewrite compatibility
//! characters we do not care about, and cost several times more. Traditional/Simplified variants
//! are not folded here: the rule compiler expands every keyword into both forms instead, so the
//! text pass stays cheap.

/// Letters seen while folding, by script.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scripts {
    /// CJK unified ideographs (Chinese characters, also used in Japanese).
    pub han: u32,
    /// Hiragana and katakana.
    pub kana: u32,
    pub hangul: u32,
    /// ASCII letters.
    pub ascii: u32,
    /// Latin letters with diacritics (é, ñ, ß ...).
    pub accented: u32,
    /// Any other alphabetic character (Cyrillic, Arabic, Thai ...).
    pub other: u32,
    /// Runs of ASCII letters (Latin words).
    pub words: u32,
    /// Of those, English function words ("the", "my", "is" ...).
    pub english: u32,
}

/// Appends `s` folded to `out`: full-width → half-width, lowercase, whitespace and control
/// characters → a space (the pipeline has already collapsed whitespace runs). ASCII runs and CJK
/// ideographs are copied in bulk; other characters are decoded one by one.
pub fn fold_into(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x80 {
            // The end of the ASCII run, 16 bytes at a time (`is_ascii` checks words at once).
            let mut end = i;
            while end + 16 <= bytes.len() && bytes[end..end + 16].is_ascii() {
                end += 16;
            }
            while end < bytes.len() && bytes[end] < 0x80 {
                end += 1;
            }
            // ASCII positions are character boundaries: copy the run, lowercase it in place.
            let run = &s[i..end];
            // A fold, not `any`: no early exit, so it vectorises.
            if run.bytes().fold(false, |c, b| c | (b < 0x20) | (b == 0x7F)) {
                for c in run.chars() {
                    out.push(if c.is_ascii_control() {
                        ' '
                    } else {
                        c.to_ascii_lowercase()
                    });
                }
            } else {
                let at = out.len();
                out.push_str(run);
                out[at..].make_ascii_lowercase();
            }
            i = end;
            continue;
        }
        if (0xE3..=0xEF).contains(&b) {
            // Three-byte characters that folding leaves alone (CJK ideographs and punctuation,
            // kana, hangul ...) are copied a run at a time. Only full-width letters and digits
            // and typographic apostrophes need folding: keywords hold no other punctuation, and
            // word boundaries look at ASCII only.
            let start = i;
            while i + 3 <= bytes.len() {
                let lead = bytes[i];
                // Ideographs (lead bytes E4–E9) are the common case and never fold.
                if (0xE4..=0xE9).contains(&lead)
                    || ((0xE3..=0xEF).contains(&lead) && !needs_fold(&bytes[i..i + 3]))
                {
                    i += 3;
                } else {
                    break;
                }
            }
            if i > start {
                out.push_str(&s[start..i]);
                continue;
            }
        }
        // Another multi-byte character: `s` is valid UTF-8 and `i` is on a boundary. Three-byte
        // characters (CJK punctuation, full-width forms) are decoded inline.
        let c = if (0xE0..=0xEF).contains(&b) && i + 3 <= bytes.len() {
            let cp = (u32::from(b & 0x0F) << 12)
                | (u32::from(bytes[i + 1] & 0x3F) << 6)
                | u32::from(bytes[i + 2] & 0x3F);
            i += 3;
            match char::from_u32(cp) {
                Some(c) => c,
                None => continue,
            }
        } else {
            let Some(c) = s[i..].chars().next() else {
                break;
            };
            i += c.len_utf8();
            c
        };
        match c {
            '\u{FF01}'..='\u{FF5E}' => {
                let a = char::from_u32(c as u32 - 0xFEE0).unwrap_or(c);
                out.push(a.to_ascii_lowercase());
            }
            // Typographic apostrophes, so `can’t` matches `can't`.
            '\u{2018}' | '\u{2019}' => out.push('\''),
            c if c.is_whitespace() => out.push(' '),
            c if (c as u32) < 0x0530 && c.is_alphabetic() => out.extend(c.to_lowercase()),
            c => out.push(c),
        }
    }
}

/// English function words (a `match` on byte strings compiles to a length switch and compares).
fn is_english_word(w: &[u8]) -> bool {
    matches!(
        w,
        b"a" | b"all"
            | b"an"
            | b"and"
            | b"any"
            | b"are"
            | b"at"
            | b"be"
            | b"been"
            | b"but"
            | b"by"
            | b"can"
            | b"can't"
            | b"cannot"
            | b"did"
            | b"do"
            | b"does"
            | b"don't"
            | b"for"
            | b"from"
            | b"had"
            | b"has"
            | b"have"
            | b"here"
            | b"i"
            | b"i'm"
            | b"i've"
            | b"in"
            | b"is"
            | b"it"
            | b"it's"
            | b"me"
            | b"my"
            | b"no"
            | b"not"
            | b"of"
            | b"on"
            | b"or"
            | b"our"
            | b"please"
            | b"since"
            | b"still"
            | b"that"
            | b"the"
            | b"their"
            | b"there"
            | b"they"
            | b"this"
            | b"to"
            | b"too"
            | b"very"
            | b"was"
            | b"we"
            | b"were"
            | b"what"
            | b"when"
            | b"why"
            | b"will"
            | b"with"
            | b"would"
            | b"you"
            | b"your"
    )
}

/// A three-byte character the fold changes: full-width digits and letters (U+FF10–FF19,
/// U+FF21–FF3A, U+FF41–FF5A), the full-width `$`, `'` and `-` that keywords use, and the
/// ideographic space (U+3000). Typographic apostrophes (U+2018, U+2019) have a lead byte below
/// the range `fold_into` copies in bulk.
fn needs_fold(c: &[u8]) -> bool {
    matches!(
        (c[0], c[1], c[2]),
        (0xEF, 0xBC, 0x84 | 0x87 | 0x8D | 0x90..=0x99)
            | (0xEF, 0xBC, 0xA1..=0xBA)
            | (0xEF, 0xBD, 0x81..=0x9A)
            | (0xE3, 0x80, 0x80)
    )
}

/// Folds a whole string (keywords, tests), collapsing whitespace runs to one space.
pub fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    fold_into(&mut out, s);
    out.split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Scripts {
    /// Counts the letters of the first `limit` bytes of folded text, by script: a sample is
    /// enough to tell the language, and keeps the cost flat for long texts.
    pub fn sample(folded: &[u8], limit: usize) -> Scripts {
        let end = folded.len().min(limit);
        let sample = &folded[..end];
        if sample.is_ascii() {
            // The common Latin case without the per-character decoding below: one pass that
            // counts letters and checks each word as it ends.
            let mut k = Scripts::default();
            let mut word = usize::MAX;
            for (i, &b) in sample.iter().enumerate() {
                if b.is_ascii_alphabetic() {
                    k.ascii += 1;
                    if word == usize::MAX {
                        word = i;
                    }
                } else if word != usize::MAX && b != b'\'' {
                    k.words += 1;
                    k.english += u32::from(is_english_word(&sample[word..i]));
                    word = usize::MAX;
                }
            }
            if word != usize::MAX {
                k.words += 1;
                // A word cut by the sample's end counts only if the text ends there too.
                if end == folded.len() && is_english_word(&sample[word..]) {
                    k.english += 1;
                }
            }
            return k;
        }
        let mut k = Scripts::default();
        // Where the current Latin word started (letters and apostrophes), if in one.
        let mut word: Option<usize> = None;
        let mut i = 0;
        while i < end {
            let b = folded[i];
            if b.is_ascii_alphabetic() || (b == b'\'' && word.is_some()) {
                if b != b'\'' {
                    k.ascii += 1;
                }
                if word.is_none() {
                    k.words += 1;
                    word = Some(i);
                }
                i += 1;
                continue;
            }
            if let Some(w) = word.take() {
                if is_english_word(&folded[w..i]) {
                    k.english += 1;
                }
            }
            if b < 0x80 {
                i += 1;
                continue;
            }
            if (0xE4..=0xE9).contains(&b) {
                k.han += 1;
                i += 3;
                continue;
            }
            if (0xE0..=0xEF).contains(&b) && i + 3 <= folded.len() {
                let cp = (u32::from(b & 0x0F) << 12)
                    | (u32::from(folded[i + 1] & 0x3F) << 6)
                    | u32::from(folded[i + 2] & 0x3F);
                i += 3;
                match cp {
                    0x3040..=0x30FF => k.kana += 1,
                    0x3400..=0x4DBF | 0xF900..=0xFAFF => k.han += 1,
                    0xAC00..=0xD7AF | 0x1100..=0x11FF | 0x3130..=0x318F => k.hangul += 1,
                    0x3000..=0x303F | 0xFF00..=0xFFEF | 0x2000..=0x206F => {}
                    _ if char::from_u32(cp).is_some_and(char::is_alphabetic) => k.other += 1,
                    _ => {}
                }
                continue;
            }
            // Decode one character (at most 4 bytes); a cut one at the end is not counted.
            let len = match b {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let Some(c) = folded
                .get(i..i + len)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.chars().next())
            else {
                i += 1;
                continue;
            };
            i += len;
            match c as u32 {
                0x3000..=0x303F | 0xFF00..=0xFFEF | 0x2000..=0x206F => {}
                0x3400..=0x4DBF | 0xF900..=0xFAFF | 0x20000..=0x3FFFF => k.han += 1,
                0x3040..=0x30FF => k.kana += 1,
                0xAC00..=0xD7AF | 0x1100..=0x11FF | 0x3130..=0x318F => k.hangul += 1,
                0x00C0..=0x024F if c.is_alphabetic() => k.accented += 1,
                _ if c.is_alphabetic() => k.other += 1,
                _ => {}
            }
        }
        // A word running into the end of the sample counts only if the text ends there too.
        if let Some(w) = word {
            if end == folded.len() && is_english_word(&folded[w..end]) {
                k.english += 1;
            }
        }
        k
    }

    /// The language of a text from its scripts and how many English function words it has:
    /// `zh`, `en`, `ja`, `ko`, `other`, or `None` when there is too little to tell (digits,
    /// emoji, a single letter).
    ///
    /// One Chinese character carries about as much as three or four Latin letters, so mixed text
    /// ("我的iPhone 15没信号") is Chinese when it has at least a quarter as many Han characters as
    /// Latin letters. Latin text is English when it has English function words (or is a short
    /// phrase without diacritics); other Latin-script languages come out as `other`.
    pub fn language(&self) -> Option<&'static str> {
        let english_words = self.english;
        let latin = self.ascii + self.accented;
        let cjk = self.han + self.kana;
        if self.hangul >= 2 && self.hangul >= cjk && self.hangul * 4 >= latin {
            return Some("ko");
        }
        if cjk >= 2 && cjk * 4 >= latin {
            // Japanese mixes kana into its kanji; Chinese has none.
            if self.kana >= 2 && self.kana * 10 >= cjk {
                return Some("ja");
            }
            return Some("zh");
        }
        if self.other >= 2 && self.other >= latin {
            return Some("other");
        }
        if latin < 2 {
            return if cjk + self.hangul + self.other > 0 {
                Some("other")
            } else {
                None
            };
        }
        // Diacritics in more than 2% of the Latin letters: not English.
        if self.accented * 50 > latin {
            return Some("other");
        }
        if english_words >= 1 && english_words * 20 >= self.words {
            return Some("en");
        }
        if self.words <= 3 {
            return Some("en");
        }
        Some("other")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_width_case_and_space() {
        assert_eq!(fold("ＷＩＦＩ　断了"), "wifi 断了");
        assert_eq!(
            fold("  No\t\n Signal！ "),
            "no signal！",
            "punctuation stays"
        );
        assert_eq!(fold("ＷＩ－ＦＩ ＄５"), "wi-fi $5");
        assert_eq!(fold("ÉTÉ Straße"), "été straße");
        assert_eq!(fold("网络，信号。"), "网络，信号。");
        assert_eq!(fold("１２３００"), "12300");
        assert_eq!(fold("can’t ＡＢＣ"), "can't abc");
        let mut out = String::new();
        fold_into(&mut out, "A\nb");
        assert_eq!(out, "a b");
    }

    fn scripts(s: &str) -> Scripts {
        let mut out = String::new();
        fold_into(&mut out, s);
        Scripts::sample(out.as_bytes(), 512)
    }

    #[test]
    fn counts_scripts() {
        let k = scripts("我的iPhone 15 没信号");
        assert_eq!(k.han, 5);
        assert_eq!(k.ascii, 6);
        assert_eq!(k.words, 1);
        let k = scripts("ネットが遅い");
        assert_eq!(k.kana, 5);
        assert_eq!(k.han, 1);
        // The sample stops at a character boundary.
        let long = "信".repeat(400);
        assert_eq!(scripts(&long).han, 171, "512 bytes: 170 and a part");
    }

    fn lang(s: &str) -> Option<&'static str> {
        scripts(s).language()
    }

    #[test]
    fn english_word_list_is_sorted_and_counted() {
        let en = |s: &[u8], limit| Scripts::sample(s, limit).english;
        assert_eq!(en(b"the network is down since the morning", 512), 4);
        assert_eq!(en(b"there's nothing", 512), 0);
        assert_eq!(en(b"the the the", 4), 1);
        assert_eq!(en(b"i can't", 512), 2);
    }

    #[test]
    fn detects_languages() {
        assert_eq!(lang("我的手机没有信号"), Some("zh"));
        assert_eq!(lang("我的iPhone 15 Pro没信号"), Some("zh"));
        assert_eq!(lang("我嘅網絡好慢"), Some("zh"));
        assert_eq!(lang("My phone has no signal since Monday"), Some("en"));
        assert_eq!(lang("Billing error"), Some("en"));
        assert_eq!(lang("No tengo señal desde ayer en mi casa"), Some("other"));
        assert_eq!(lang("Mein Internet ist seit gestern kaputt"), Some("other"));
        assert_eq!(lang("インターネットが遅いです"), Some("ja"));
        assert_eq!(lang("인터넷이 안 돼요"), Some("ko"));
        assert_eq!(lang("Интернет не работает"), Some("other"));
        assert_eq!(lang("อินเทอร์เน็ตใช้ไม่ได้"), Some("other"));
        assert_eq!(lang("13800138000 !!!"), None);
        assert_eq!(lang(""), None);
    }
}
