//! A small builder for ONNX graphs: nodes with generated value names, constants and weights as
//! initializers, and the final model with weights inline or in an external data file.

use std::path::Path;

use prost::Message;

use crate::proto::{
    AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, TypeProtoTensor,
    ValueInfoProto, attr_type, dtype,
};

/// The ONNX operator set the graphs use (the default domain).
pub const OPSET: i64 = 23;
/// The IR version that goes with [`OPSET`].
pub const IR_VERSION: i64 = 11;
/// Protobuf messages cannot exceed 2 GiB; past this many bytes of weights they go to a side file
/// (the default of `gram-export onnx --external-data-over`).
pub const INLINE_LIMIT: usize = 1 << 30;

/// An attribute value.
pub enum Attr {
    /// One integer.
    Int(i64),
    /// Integers.
    Ints(Vec<i64>),
    /// One float.
    Float(f32),
    /// A tensor (for ConstantOfShape's value).
    Tensor(TensorProto),
}

/// A weight or constant before it is placed inline or in the data file.
struct Init {
    name: String,
    dims: Vec<i64>,
    data_type: i32,
    bytes: Vec<u8>,
}

/// Collects nodes and initializers.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    inits: Vec<Init>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    counter: usize,
}

/// A tensor type with named (dynamic) or fixed dimensions.
pub fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Dimension {
                dim_value: Some(*n),
                dim_param: None,
            },
            Dim::Named(s) => Dimension {
                dim_value: None,
                dim_param: Some((*s).to_string()),
            },
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: Some(elem_type),
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

/// One dimension of a graph input or output.
pub enum Dim {
    /// A size fixed at export.
    Fixed(i64),
    /// A dynamic axis, by name (`batch`, `sequence`).
    Named(&'static str),
}

impl Graph {
    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem_type: i32, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem_type, dims));
        name.to_string()
    }

    /// Declares a graph output (an existing value renamed through Identity).
    pub fn output(&mut self, value: &str, name: &str, elem_type: i32, dims: &[Dim]) {
        self.node_named("Identity", &[value], name, vec![]);
        self.outputs.push(value_info(name, elem_type, dims));
    }

    fn fresh(&mut self, op: &str) -> String {
        self.counter += 1;
        format!("{}_{}", op.to_ascii_lowercase(), self.counter)
    }

    /// Adds a node with one output and returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(op);
        self.node_named(op, inputs, &out, attrs);
        out
    }

    /// Adds a node with several outputs.
    pub fn node_multi(
        &mut self,
        op: &str,
        inputs: &[&str],
        n_out: usize,
        attrs: Vec<(&str, Attr)>,
    ) -> Vec<String> {
        let base = self.fresh(op);
        let outs: Vec<String> = (0..n_out).map(|i| format!("{base}_{i}")).collect();
        self.push(op, inputs, &outs, attrs, &base);
        outs
    }

    fn node_named(&mut self, op: &str, inputs: &[&str], out: &str, attrs: Vec<(&str, Attr)>) {
        let name = format!("n_{out}");
        self.push(op, inputs, &[out.to_string()], attrs, &name);
    }

    fn push(
        &mut self,
        op: &str,
        inputs: &[&str],
        outs: &[String],
        attrs: Vec<(&str, Attr)>,
        name: &str,
    ) {
        let attribute = attrs
            .into_iter()
            .map(|(k, v)| {
                let mut a = AttributeProto {
                    name: Some(k.to_string()),
                    ..Default::default()
                };
                match v {
                    Attr::Int(i) => {
                        a.i = Some(i);
                        a.r#type = Some(attr_type::INT);
                    }
                    Attr::Ints(v) => {
                        a.ints = v;
                        a.r#type = Some(attr_type::INTS);
                    }
                    Attr::Float(f) => {
                        a.f = Some(f);
                        a.r#type = Some(attr_type::FLOAT);
                    }
                    Attr::Tensor(t) => {
                        a.t = Some(t);
                        a.r#type = Some(attr_type::TENSOR);
                    }
                }
                a
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_string()).collect(),
            output: outs.to_vec(),
            name: Some(name.to_string()),
            op_type: Some(op.to_string()),
            attribute,
            domain: None,
        });
    }

    /// Whether an initializer of that name exists.
    pub fn has(&self, name: &str) -> bool {
        self.inits.iter().any(|i| i.name == name)
    }

    /// An f32 initializer.
    pub fn weight(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.inits.push(Init {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dtype::FLOAT,
            bytes,
        });
        name.to_string()
    }

    /// An f32 scalar constant.
    pub fn scalar(&mut self, x: f32) -> String {
        let name = self.fresh("const_f");
        self.weight(&name, &[], &[x]);
        name
    }

    /// An int64 constant (a 1-D tensor, or a scalar with `dims = []`).
    pub fn ints(&mut self, dims: &[usize], values: &[i64]) -> String {
        let name = self.fresh("const_i");
        self.inits.push(Init {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dtype::INT64,
            bytes: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
        name
    }

    /// A 1-D int64 constant.
    pub fn vec_i64(&mut self, values: &[i64]) -> String {
        self.ints(&[values.len()], values)
    }

    /// Number of nodes so far.
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Writes `model.onnx` (and `model.onnx.data` when the weights pass `inline_limit` bytes) into
    /// `dir`. Returns the files written, for the caller's atomic folder rename.
    pub fn write(
        self,
        dir: &Path,
        file: &str,
        metadata: &[(&str, String)],
        doc: &str,
        inline_limit: usize,
    ) -> std::io::Result<Vec<String>> {
        let total: usize = self.inits.iter().map(|i| i.bytes.len()).sum();
        let external = total > inline_limit;
        let data_name = format!("{file}.data");
        let mut files = vec![file.to_string()];
        let mut data_file = if external {
            files.push(data_name.clone());
            Some(std::io::BufWriter::new(std::fs::File::create(
                dir.join(&data_name),
            )?))
        } else {
            None
        };
        let mut offset = 0usize;
        let mut initializer = Vec::with_capacity(self.inits.len());
        for init in self.inits {
            let mut t = TensorProto {
                dims: init.dims,
                data_type: Some(init.data_type),
                name: Some(init.name),
                ..Default::default()
            };
            match data_file.as_mut() {
                // Small constants stay inline; weights go to the side file, 64-byte aligned.
                Some(w) if init.bytes.len() >= 1024 => {
                    use std::io::Write;
                    let pad = offset.next_multiple_of(64) - offset;
                    w.write_all(&vec![0u8; pad])?;
                    offset += pad;
                    w.write_all(&init.bytes)?;
                    let entry = |k: &str, v: String| StringStringEntryProto {
                        key: Some(k.into()),
                        value: Some(v),
                    };
                    t.external_data = vec![
                        entry("location", data_name.clone()),
                        entry("offset", offset.to_string()),
                        entry("length", init.bytes.len().to_string()),
                    ];
                    t.data_location = Some(1);
                    offset += init.bytes.len();
                }
                _ => t.raw_data = Some(init.bytes),
            }
            initializer.push(t);
        }
        if let Some(mut w) = data_file {
            use std::io::Write;
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        let model = ModelProto {
            ir_version: Some(IR_VERSION),
            producer_name: Some("gram-export".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            doc_string: Some(doc.to_string()),
            graph: Some(GraphProto {
                node: self.nodes,
                name: Some("gram".into()),
                initializer,
                input: self.inputs,
                output: self.outputs,
            }),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET),
            }],
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: Some((*k).to_string()),
                    value: Some(v.clone()),
                })
                .collect(),
        };
        let mut f = std::fs::File::create(dir.join(file))?;
        std::io::Write::write_all(&mut f, &model.encode_to_vec())?;
        f.sync_all()?;
        Ok(files)
    }
}
