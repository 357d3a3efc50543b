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
}

/// Appends `s` folded to `out`: full-width → half-width, lowercase, whitespace runs → one space.
/// Returns the script counts of what it folded.
pub fn fold_into(out: &mut String, s: &str) -> Scripts {
    let mut k = Scripts::default();
    let mut in_word = false;
    let mut space = out.is_empty() || out.ends_with(' ');
    for c in s.chars() {
        let c = match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            // Typographic apostrophes, so `can’t` matches `can't`.
            '\u{2018}' | '\u{2019}' => '\'',
            _ => c,
        };
        if c.is_ascii() {
            if c.is_ascii_alphabetic() {
                k.ascii += 1;
                if !in_word {
                    k.words += 1;
                    in_word = true;
                }
                out.push(c.to_ascii_lowercase());
                space = false;
                continue;
            }
            in_word = false;
            if c.is_ascii_whitespace() || c.is_ascii_control() {
                if !space {
                    out.push(' ');
                    space = true;
                }
                continue;
            }
            out.push(c);
            space = false;
            continue;
        }
        in_word = false;
        let u = c as u32;
        match u {
            0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0xF900..=0xFAFF | 0x20000..=0x3FFFF => {
                k.han += 1;
                out.push(c);
            }
            0x3040..=0x30FF => {
                k.kana += 1;
                out.push(c);
            }
            0xAC00..=0xD7AF | 0x1100..=0x11FF | 0x3130..=0x318F => {
                k.hangul += 1;
                out.push(c);
            }
            // CJK punctuation and symbols: no case, not letters.
            0x3000..=0x303F | 0xFF00..=0xFFEF | 0x2000..=0x206F => {
                if c == '\u{3000}' || c.is_whitespace() {
                    if !space {
                        out.push(' ');
                        space = true;
                    }
                    continue;
                }
                out.push(c);
            }
            _ => {
                if c.is_whitespace() {
                    if !space {
                        out.push(' ');
                        space = true;
                    }
                    continue;
                }
                if c.is_alphabetic() {
                    if (0x00C0..=0x024F).contains(&u) {
                        k.accented += 1;
                    } else {
                        k.other += 1;
                    }
                    out.extend(c.to_lowercase());
                } else {
                    out.push(c);
                }
            }
        }
        space = false;
    }
    k
}

/// Folds a whole string (keywords, tests).
pub fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    fold_into(&mut out, s);
    let t = out.trim();
    if t.len() == out.len() {
        out
    } else {
        t.to_string()
    }
}

impl Scripts {
    pub fn add(&mut self, o: Scripts) {
        self.han += o.han;
        self.kana += o.kana;
        self.hangul += o.hangul;
        self.ascii += o.ascii;
        self.accented += o.accented;
        self.other += o.other;
        self.words += o.words;
    }

    /// The language of a text from its scripts and how many English function words it has:
    /// `zh`, `en`, `ja`, `ko`, `other`, or `None` when there is too little to tell (digits,
    /// emoji, a single letter).
    ///
    /// One Chinese character carries about as much as three or four Latin letters, so mixed text
    /// ("我的iPhone 15没信号") is Chinese when it has at least a quarter as many Han characters as
    /// Latin letters. Latin text is English when it has English function words (or is a short
    /// phrase without diacritics); other Latin-script languages come out as `other`.
    pub fn language(&self, english_words: u32) -> Option<&'static str> {
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
        assert_eq!(fold("  No\t\n Signal！ "), "no signal!");
        assert_eq!(fold("ÉTÉ Straße"), "été straße");
        assert_eq!(fold("网络，信号。"), "网络,信号。");
        assert_eq!(fold("１２３００"), "12300");
    }

    #[test]
    fn counts_scripts() {
        let mut s = String::new();
        let k = fold_into(&mut s, "我的iPhone 15 没信号");
        assert_eq!(k.han, 5);
        assert_eq!(k.ascii, 6);
        assert_eq!(k.words, 1);
        let k = fold_into(&mut s, "ネットが遅い");
        assert_eq!(k.kana, 5);
        assert_eq!(k.han, 1);
    }

    fn lang(s: &str, en: u32) -> Option<&'static str> {
        let mut out = String::new();
        fold_into(&mut out, s).language(en)
    }

    #[test]
    fn detects_languages() {
        assert_eq!(lang("我的手机没有信号", 0), Some("zh"));
        assert_eq!(lang("我的iPhone 15 Pro没信号", 0), Some("zh"));
        assert_eq!(lang("我嘅網絡好慢", 0), Some("zh"));
        assert_eq!(lang("My phone has no signal since Monday", 3), Some("en"));
        assert_eq!(lang("Billing error", 0), Some("en"));
        assert_eq!(lang("No tengo señal desde ayer en mi casa", 0), Some("other"));
        assert_eq!(lang("Mein Internet ist seit gestern kaputt", 0), Some("other"));
        assert_eq!(lang("インターネットが遅いです", 0), Some("ja"));
        assert_eq!(lang("인터넷이 안 돼요", 0), Some("ko"));
        assert_eq!(lang("Интернет не работает", 0), Some("other"));
        assert_eq!(lang("13800138000 !!!", 0), None);
        assert_eq!(lang("", 0), None);
    }
}
