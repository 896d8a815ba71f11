//! Tokenizers as users have them: a model folder's `tokenizer.json` + `tokenizer_config.json`
//! (+ `chat_template.jinja`), or the tokenizer embedded in a GGUF, turned into a `tokenizers`
//! tokenizer the way transformers' GGUF converter does.

use std::path::{Path, PathBuf};

use serde_json::{Value as Json, json};
use tokenizers::Tokenizer;

use crate::chat::ChatTemplate;
use crate::error::{Error, Result, read_file};
use crate::gguf::GgufFile;

/// A tokenizer with what GRAM needs around it.
pub struct GramTokenizer {
    /// The `tokenizers` tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, if the model has one.
    pub chat_template: Option<ChatTemplate>,
    /// The beginning-of-sequence token text, if any.
    pub bos_token: Option<String>,
    /// The end-of-sequence token text, if any.
    pub eos_token: Option<String>,
    /// The padding token text, if any.
    pub pad_token: Option<String>,
    /// Where it came from (for messages).
    pub source: PathBuf,
}

impl std::fmt::Debug for GramTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GramTokenizer")
            .field("source", &self.source)
            .field("vocab", &self.vocab_size())
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn token_text(v: Option<&Json>) -> Option<String> {
    match v {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl GramTokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` from a folder
    /// (the last two optional).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(Error::format(dir, "no tokenizer.json in this folder"));
        }
        let tokenizer = Tokenizer::from_bytes(read_file(&tj)?)
            .map_err(|e| Error::format(&tj, format!("not a valid tokenizer.json: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = if cfg_path.exists() {
            serde_json::from_slice(&read_file(&cfg_path)?)
                .map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?
        } else {
            json!({})
        };
        let bos_token = token_text(cfg.get("bos_token"));
        let eos_token = token_text(cfg.get("eos_token"));
        let pad_token = token_text(cfg.get("pad_token"));
        // transformers 5 writes the template to chat_template.jinja; older versions keep it in
        // tokenizer_config.json (a string, or a list of named templates).
        let jinja = dir.join("chat_template.jinja");
        let template_src = if jinja.exists() {
            Some(
                String::from_utf8(read_file(&jinja)?)
                    .map_err(|_| Error::format(&jinja, "not UTF-8"))?,
            )
        } else {
            match cfg.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Json::as_str))
                    .map(str::to_string),
                _ => None,
            }
        };
        let chat_template = template_src
            .map(|s| {
                ChatTemplate::new(
                    &s,
                    bos_token.as_deref().unwrap_or(""),
                    eos_token.as_deref().unwrap_or(""),
                )
            })
            .transpose()?;
        Ok(Self {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            pad_token,
            source: dir.to_path_buf(),
        })
    }

    /// The tokenizer embedded in a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        from_gguf(g)
    }

    /// Loads from a model path: a folder with tokenizer.json, or a `.gguf` file.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::from_dir(path)
        } else {
            Self::from_gguf(&GgufFile::open(path)?)
        }
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token ids of `text`; `add_special` applies the tokenizer's post-processor (BOS etc.).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode_fast(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a token text, if it is one token of the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The id of the padding token: `pad_token`, else `eos_token`, else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_token
            .as_deref()
            .or(self.eos_token.as_deref())
            .and_then(|t| self.token_id(t))
            .unwrap_or(0)
    }

    /// A fingerprint of the vocabulary (FNV-1a of tokens in id order), to check that a dataset was
    /// tokenised by the same tokenizer as the model's.
    pub fn fingerprint(&self) -> String {
        let mut vocab: Vec<(String, u32)> = self.tokenizer.get_vocab(true).into_iter().collect();
        vocab.sort_by_key(|(_, id)| *id);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (t, id) in vocab {
            for b in t.bytes().chain(id.to_le_bytes()) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }

    /// Saves `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
    /// `chat_template.jinja` into `dir`.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let json = self
            .tokenizer
            .to_string(true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        crate::atomic_write(&dir.join("tokenizer.json"), json.as_bytes())?;
        let mut cfg = json!({
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
        });
        // Also here for readers older than transformers 5, which look nowhere else.
        if let (Some(t), Some(c)) = (&self.chat_template, cfg.as_object_mut()) {
            c.insert("chat_template".into(), t.source().into());
        }
        let text =
            serde_json::to_string_pretty(&cfg).map_err(|e| Error::Internal(e.to_string()))?;
        crate::atomic_write(&dir.join("tokenizer_config.json"), text.as_bytes())?;
        if let Some(t) = &self.chat_template {
            crate::atomic_write(&dir.join("chat_template.jinja"), t.source().as_bytes())?;
        }
        Ok(())
    }
}

/// GPT-2's pre-tokenisation (ByteLevel with its own regex) is the default; these GGUF `pre`
/// names use a Split regex first (values from llama.cpp's and transformers' converters).
fn pre_tokenizer_for(pre: &str, path: &Path) -> Result<Json> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]})
    };
    Ok(match pre {
        "" | "default" | "gpt2" | "smollm" | "gpt-2" => byte_level(true),
        "llama-bpe" | "llama3" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        "qwen2" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        other => {
            return Err(Error::unsupported(
                path,
                "tokenizer.ggml.pre",
                format!("`{other}` (supported: default, gpt2, smollm, llama-bpe, qwen2)"),
            ));
        }
    })
}

/// Builds a `tokenizers` tokenizer from a GGUF's `tokenizer.ggml.*` metadata.
pub fn from_gguf(g: &GgufFile) -> Result<GramTokenizer> {
    let path = &g.path;
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if model != "gpt2" {
        return Err(Error::unsupported(
            path,
            "tokenizer.ggml.model",
            format!("`{model}` (supported: gpt2, the byte-level BPE of LLaMA 3, Qwen, SmolLM)"),
        ));
    }
    let tokens = g.strings("tokenizer.ggml.tokens").ok_or_else(|| {
        Error::format(
            path,
            "metadata `tokenizer.ggml.tokens` is missing or not strings",
        )
    })?;
    let merges = g.strings("tokenizer.ggml.merges").ok_or_else(|| {
        Error::format(
            path,
            "metadata `tokenizer.ggml.merges` is missing or not strings",
        )
    })?;
    let types: Vec<i64> = match g
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
    {
        Some(a) => a
            .iter()
            .map(|v| v.as_f64().map_or(1, |x| x as i64))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, &t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(id));
        // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == 4, "special": ty == 3}),
            );
        }
    }
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            Error::format(
                path,
                format!("tokenizer.ggml.merges[{i}] = `{m}` is not two tokens"),
            )
        })?;
        merge_pairs.push(json!([a, b]));
    }
    let tok_at = |key: &str| -> Option<String> {
        g.get(key)
            .and_then(|v| v.as_u64())
            .and_then(|id| tokens.get(id as usize))
            .map(|s| s.to_string())
    };
    let bos = tok_at("tokenizer.ggml.bos_token_id");
    let eos = tok_at("tokenizer.ggml.eos_token_id");
    let pad = tok_at("tokenizer.ggml.padding_token_id");
    let unk = tok_at("tokenizer.ggml.unknown_token_id");
    let add_bos = matches!(
        g.get("tokenizer.ggml.add_bos_token"),
        Some(crate::gguf::Value::Bool(true))
    );
    let post = match (&bos, add_bos) {
        (Some(b), true) => {
            let id = tokens.iter().position(|t| t == b).unwrap_or(0);
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b.as_str(): {"id": b, "ids": [id], "tokens": [b]}}})
        }
        _ => json!({"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}}),
    };
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_for(pre, path)?,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merge_pairs},
    });
    let text = serde_json::to_string(&doc).map_err(|e| Error::Internal(e.to_string()))?;
    let tokenizer: Tokenizer = text
        .parse()
        .map_err(|e| Error::format(path, format!("embedded tokenizer does not build: {e}")))?;
    let chat_template = g
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(|s| {
            ChatTemplate::new(
                s,
                bos.as_deref().unwrap_or(""),
                eos.as_deref().unwrap_or(""),
            )
        })
        .transpose()?;
    Ok(GramTokenizer {
        tokenizer,
        chat_template,
        bos_token: bos,
        eos_token: eos.clone(),
        pad_token: pad.or(eos),
        source: path.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_folders_carry_the_chat_template_in_both_places() -> Result<()> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/smollm2");
        let tok = GramTokenizer::from_dir(&src)?;
        let template = tok.chat_template.as_ref().map(|t| t.source().to_string());
        assert!(
            template.is_some(),
            "the SmolLM2 fixture has a chat template"
        );
        let dir = std::env::temp_dir().join(format!("gram-core-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        tok.save_dir(&dir)?;
        let cfg: Json = serde_json::from_slice(&read_file(&dir.join("tokenizer_config.json"))?)
            .map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(cfg["chat_template"].as_str(), template.as_deref());
        let jinja = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        assert_eq!(jinja.as_deref(), template.as_deref());
        // And it loads back the same.
        let again = GramTokenizer::from_dir(&dir)?;
        assert_eq!(again.fingerprint(), tok.fingerprint());
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
