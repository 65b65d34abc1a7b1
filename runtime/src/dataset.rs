//! Labelled image datasets for evaluation: this module owns every dataset file format the
//! runtime reads (Fashion-MNIST and other IDX files, CIFAR-10 binary batches, numpy `.npz`
//! archives), turns them into one in-memory form ([`Dataset`]: NCHW pixels plus `i64` labels),
//! and normalises single samples into model input. IDX and CIFAR-10 files are parsed here; `.npz`
//! archives are opened with `zip` and their `.npy` arrays decoded with `npyz`, with the checks
//! npyz does not make done here. Every malformed file is reported as [`Error::Dataset`] naming
//! the file, what was expected and what was found, and no reader over-allocates on hostile
//! input: sizes in headers are always checked against the bytes actually present before they
//! are trusted. (npyz multiplies `.npy` dimensions without overflow checks; the workspace turns
//! its overflow checks off in every profile, and the shape's size is checked here.)

use std::fs;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::format::per_channel;
use crate::model::Model;

/// Where the Debian package `dataset-fashion-mnist` installs the IDX files.
const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The remedy printed whenever the Fashion-MNIST files are missing.
const FASHION_MNIST_HINT: &str =
    "install the Debian package dataset-fashion-mnist (scripts/setup does) or pass --data-dir";

/// Every spec [`Dataset::open`] understands, for the "unknown spec" message.
const ACCEPTED_SPECS: &str = "fashion-mnist:test, fashion-mnist:train, idx:IMAGES,LABELS, \
     cifar10:test, cifar10:train, cifar10:FILE.bin, npz:FILE (or any path ending in .npz)";

/// Shape of one CIFAR-10 image: 3 channel planes of 32x32.
const CIFAR_SHAPE: [usize; 3] = [3, 32, 32];

/// One CIFAR-10 binary record: a label byte followed by the channel-major pixels.
const CIFAR_RECORD: usize = 1 + CIFAR_SHAPE[0] * CIFAR_SHAPE[1] * CIFAR_SHAPE[2];

/// Folder the official CIFAR-10 binary tarball extracts to; also searched under `--data-dir`.
const CIFAR_TARBALL_DIR: &str = "cifar-10-batches-bin";

/// Pixel storage: u8 pixels are raw values (the model's `scale` is applied when normalising);
/// f32 pixels are taken as already scaled (only mean/std are applied).
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

impl Pixels {
    fn truncate(&mut self, n: usize) {
        match self {
            Pixels::U8(p) => p.truncate(n),
            Pixels::F32(p) => p.truncate(n),
        }
    }
}

/// A labelled set of images held in memory, whatever file format it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The spec it was opened with, e.g. "fashion-mnist:test"; used in reports.
    pub name: String,
    /// C, H, W of one sample.
    pub shape: [usize; 3],
    /// N*C*H*W values, sample-major, channel-major (NCHW).
    pub pixels: Pixels,
    /// N labels.
    pub labels: Vec<i64>,
}

impl Dataset {
    /// Opens `spec` (see [`Dataset::open`]) for `model`: at most `limit` samples, which must have
    /// the shape of the model's input.
    pub fn open_for(spec: &str, data_dir: Option<&Path>, limit: Option<usize>, model: &Model) -> Result<Dataset> {
        let mut ds = Dataset::open(spec, data_dir)?;
        if let Some(n) = limit {
            ds.truncate(n);
        }
        if ds.shape[..] != model.meta.input.shape[..] {
            return Err(Error::Input(format!(
                "dataset {} has samples of shape {:?}, but model {} expects {:?}",
                ds.name,
                ds.shape,
                model.name(),
                model.meta.input.shape
            )));
        }
        if ds.is_empty() {
            return Err(Error::Dataset(format!("{} has no samples", ds.name)));
        }
        Ok(ds)
    }

    /// The samples `range`, normalised with `model`'s input spec, as an `[n, C, H, W]` batch.
    pub fn batch(&self, model: &Model, range: std::ops::Range<usize>) -> Tensor {
        let len = self.sample_len();
        let mut data = vec![0f32; range.len() * len];
        let inp = &model.meta.input;
        for (row, i) in range.clone().enumerate() {
            self.write_normalised(i, inp.scale, &inp.mean, &inp.std, &mut data[row * len..(row + 1) * len]);
        }
        let mut shape = vec![range.len()];
        shape.extend_from_slice(&self.shape);
        Tensor { shape, data }
    }

    /// Opens a dataset by spec:
    ///
    /// - `fashion-mnist:test` | `fashion-mnist:train`: the gzip IDX files
    ///   `t10k-images-idx3-ubyte.gz` / `t10k-labels-idx1-ubyte.gz` (or the `train-` pair) in
    ///   `data_dir`, or, when that is `None`, in `/usr/share/datasets/fashion-mnist`, where the
    ///   Debian package `dataset-fashion-mnist` installs them.
    /// - `idx:IMAGES,LABELS`: an explicit IDX image file and label file, each gzip-compressed (it
    ///   starts with the gzip magic 1f 8b) or raw.
    /// - `cifar10:test` | `cifar10:train`: the CIFAR-10 binary version in `data_dir` (or in its
    ///   `cifar-10-batches-bin` folder, the tarball's layout): `test_batch.bin`, or
    ///   `data_batch_1.bin` … `data_batch_5.bin` concatenated. `data_dir` is required.
    /// - `cifar10:PATH.bin`: one CIFAR-10 binary batch file.
    /// - `npz:PATH`, or any path ending in `.npz`: a numpy archive with arrays `x` (N x C x H x W
    ///   or N x H x W; uint8, float32 or float64) and `y` (N integer labels), stored or deflated.
    ///
    /// Relative paths are relative to the working directory.
    ///
    /// # Errors
    /// [`Error::Dataset`] for an unknown spec, missing Fashion-MNIST files, or a file whose
    /// contents are not what its format requires (the message names the file, what was expected
    /// and what was found); [`Error::Io`] when a named file cannot be read.
    pub fn open(spec: &str, data_dir: Option<&Path>) -> Result<Dataset> {
        if let Some(split) = spec.strip_prefix("fashion-mnist:") {
            open_fashion_mnist(spec, split, data_dir)
        } else if let Some(rest) = spec.strip_prefix("idx:") {
            match rest.split_once(',') {
                Some((images, labels)) if !images.is_empty() && !labels.is_empty() => {
                    read_idx_pair(spec, Path::new(images), Path::new(labels))
                }
                _ => Err(Error::Dataset(format!(
                    "'{spec}': expected idx:IMAGES,LABELS (two file paths separated by a comma)"
                ))),
            }
        } else if let Some(rest) = spec.strip_prefix("cifar10:") {
            open_cifar10(spec, rest, data_dir)
        } else if let Some(path) = spec.strip_prefix("npz:") {
            read_npz(spec, Path::new(path))
        } else if spec.ends_with(".npz") {
            read_npz(spec, Path::new(spec))
        } else {
            Err(Error::Dataset(format!("unknown dataset '{spec}'; expected one of: {ACCEPTED_SPECS}")))
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Keeps the first n samples (n larger than len is fine), so runs can be limited to a prefix.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.pixels.truncate(n * self.sample_len());
    }

    /// Keeps the samples at these indices, in this order (used to build biased subsets). The
    /// result keeps this dataset's name.
    ///
    /// # Panics
    /// If an index is not below [`len`](Self::len); indices come from the caller, not from a file.
    #[must_use]
    pub fn select(&self, indices: &[usize]) -> Dataset {
        fn gather<T: Copy>(values: &[T], n: usize, indices: &[usize]) -> Vec<T> {
            indices.iter().flat_map(|&i| &values[i * n..(i + 1) * n]).copied().collect()
        }
        let n = self.sample_len();
        let pixels = match &self.pixels {
            Pixels::U8(p) => Pixels::U8(gather(p, n, indices)),
            Pixels::F32(p) => Pixels::F32(gather(p, n, indices)),
        };
        Dataset {
            name: self.name.clone(),
            shape: self.shape,
            pixels,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// Number of values per sample, C*H*W.
    pub fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Writes sample i, normalised, into `out` (len == `sample_len()`):
    /// `value = (pixel * s - mean[c]) / std[c]`, where s = scale for U8 pixels and 1.0 for F32
    /// pixels. mean/std have one entry per channel (a single entry applies to every channel).
    ///
    /// # Panics
    /// If `i` is not below [`len`](Self::len), `out` is not [`sample_len`](Self::sample_len)
    /// long, or mean/std have neither 1 nor C entries: these are caller errors (the model's
    /// preprocessing metadata is validated where it is loaded), not properties of the file.
    pub fn write_normalised(&self, i: usize, scale: f32, mean: &[f32], std: &[f32], out: &mut [f32]) {
        let n = self.sample_len();
        let [channels, height, width] = self.shape;
        assert!(i < self.len(), "sample {i} out of range: {} has {} samples", self.name, self.len());
        assert_eq!(out.len(), n, "output buffer length must equal sample_len()");
        for (what, values) in [("mean", mean), ("std", std)] {
            assert!(
                values.len() == 1 || values.len() == channels,
                "{what} has {} entries; expected 1 or {channels} (one per channel)",
                values.len()
            );
        }
        let plane = height * width;
        if plane == 0 {
            return;
        }
        let start = i * n;
        for (c, dst) in out.chunks_exact_mut(plane).enumerate() {
            let (m, sd) = (per_channel(mean, c), per_channel(std, c));
            let from = start + c * plane;
            match &self.pixels {
                Pixels::U8(p) => {
                    for (o, &v) in dst.iter_mut().zip(&p[from..from + plane]) {
                        *o = (f32::from(v) * scale - m) / sd;
                    }
                }
                Pixels::F32(p) => {
                    for (o, &v) in dst.iter_mut().zip(&p[from..from + plane]) {
                        *o = (v - m) / sd;
                    }
                }
            }
        }
    }
}

/// A dataset error about one file: `"{path}: {message}"`.
fn file_error(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Dataset(format!("{}: {message}", path.display()))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads a file, gunzipping it when it starts with the gzip magic, so that both the compressed
/// files the Fashion-MNIST package ships and raw IDX files work.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = read_file(path)?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(|e| {
        file_error(path, format!("expected valid gzip data, found a corrupt or truncated stream ({e})"))
    })?;
    Ok(out)
}

/// Product of dimensions, or `None` when it does not fit in `usize` (only hostile headers).
fn element_count(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn dims_text(dims: &[usize]) -> String {
    let parts: Vec<String> = dims.iter().map(usize::to_string).collect();
    parts.join("x")
}

fn open_fashion_mnist(spec: &str, split: &str, data_dir: Option<&Path>) -> Result<Dataset> {
    let prefix = match split {
        "test" => "t10k",
        "train" => "train",
        _ => {
            return Err(Error::Dataset(format!(
                "unknown dataset '{spec}'; expected fashion-mnist:test or fashion-mnist:train"
            )))
        }
    };
    let dir = data_dir.unwrap_or(Path::new(FASHION_MNIST_DIR));
    let images = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let missing: Vec<String> =
        [&images, &labels].into_iter().filter(|p| !p.is_file()).map(|p| p.display().to_string()).collect();
    if !missing.is_empty() {
        let found = if dir.is_dir() {
            format!("missing {}", missing.join(" and "))
        } else {
            format!("directory {} does not exist", dir.display())
        };
        return Err(Error::Dataset(format!(
            "{spec} needs {} and {}, but {found}; {FASHION_MNIST_HINT}",
            images.display(),
            labels.display()
        )));
    }
    read_idx_pair(spec, &images, &labels)
}

/// The dimensions and payload of one IDX file.
struct Idx {
    dims: Vec<usize>,
    data: Vec<u8>,
}

fn read_idx(path: &Path) -> Result<Idx> {
    let bytes = read_maybe_gzip(path)?;
    parse_idx(bytes).map_err(|m| file_error(path, m))
}

/// Parses an IDX file of unsigned bytes: magic 00 00 08 NDIMS, NDIMS big-endian u32 dimensions,
/// then exactly the product of the dimensions in bytes.
fn parse_idx(mut bytes: Vec<u8>) -> Result<Idx, String> {
    let Some(&[z0, z1, kind, ndims]) = bytes.first_chunk::<4>() else {
        return Err(format!("expected an IDX header (magic 00 00 08 NDIMS), found a {}-byte file", bytes.len()));
    };
    if [z0, z1] != [0, 0] {
        return Err(format!("expected IDX magic 00 00 08 NDIMS, found {z0:02x} {z1:02x} {kind:02x} {ndims:02x}"));
    }
    if kind != 0x08 {
        return Err(format!("expected IDX data type 0x08 (unsigned byte), found 0x{kind:02x}"));
    }
    let header = 4 + 4 * usize::from(ndims);
    if bytes.len() < header {
        return Err(format!(
            "expected a {header}-byte IDX header for {ndims} dimensions, found only {} bytes",
            bytes.len()
        ));
    }
    let dims: Vec<usize> =
        bytes[4..header].chunks_exact(4).map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize).collect();
    let expected = element_count(&dims).ok_or_else(|| format!("IDX dimensions {} are too large", dims_text(&dims)))?;
    let found = bytes.len() - header;
    if found != expected {
        let why = if found < expected { "the file is truncated" } else { "trailing bytes after the data" };
        return Err(format!(
            "expected {expected} bytes of data for IDX dimensions {}, found {found} ({why})",
            dims_text(&dims)
        ));
    }
    bytes.drain(..header);
    Ok(Idx { dims, data: bytes })
}

fn read_idx_pair(name: &str, images_path: &Path, labels_path: &Path) -> Result<Dataset> {
    let images = read_idx(images_path)?;
    let &[n, h, w] = images.dims.as_slice() else {
        return Err(file_error(
            images_path,
            format!(
                "expected a 3-dimensional IDX image file (N x H x W), found {} dimensions ({})",
                images.dims.len(),
                dims_text(&images.dims)
            ),
        ));
    };
    let labels = read_idx(labels_path)?;
    if labels.dims.len() != 1 {
        return Err(file_error(
            labels_path,
            format!(
                "expected a 1-dimensional IDX label file, found {} dimensions ({})",
                labels.dims.len(),
                dims_text(&labels.dims)
            ),
        ));
    }
    if labels.data.len() != n {
        return Err(Error::Dataset(format!(
            "{} has {} labels but {} has {n} images; expected one label per image",
            labels_path.display(),
            labels.data.len(),
            images_path.display()
        )));
    }
    Ok(Dataset {
        name: name.to_string(),
        shape: [1, h, w],
        pixels: Pixels::U8(images.data),
        labels: labels.data.iter().map(|&l| i64::from(l)).collect(),
    })
}

fn open_cifar10(spec: &str, rest: &str, data_dir: Option<&Path>) -> Result<Dataset> {
    let names: Vec<String> = match rest {
        "test" => vec!["test_batch.bin".to_string()],
        "train" => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        "" => {
            return Err(Error::Dataset(format!("'{spec}': expected cifar10:test, cifar10:train or cifar10:FILE.bin")))
        }
        path => return read_cifar_files(spec, &[PathBuf::from(path)]),
    };
    let dir = data_dir.ok_or_else(|| {
        Error::Dataset(format!(
            "{spec} needs --data-dir: the directory holding the CIFAR-10 binary version ({})",
            names.join(", ")
        ))
    })?;
    // Accept both the directory itself and the directory the official tarball was extracted in.
    let nested = dir.join(CIFAR_TARBALL_DIR);
    let dir = if !dir.join(&names[0]).exists() && nested.join(&names[0]).exists() { &nested } else { dir };
    let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    read_cifar_files(spec, &files)
}

/// Reads and concatenates CIFAR-10 binary batches: records of one label byte followed by
/// 3x32x32 channel-major pixels.
fn read_cifar_files(name: &str, files: &[PathBuf]) -> Result<Dataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        let bytes = read_file(path)?;
        if bytes.is_empty() || bytes.len() % CIFAR_RECORD != 0 {
            return Err(file_error(
                path,
                format!(
                    "expected a CIFAR-10 binary batch of {CIFAR_RECORD}-byte records \
                     (1 label byte + 3x32x32 pixels), found {} bytes, which is not a \
                     positive multiple of {CIFAR_RECORD}",
                    bytes.len()
                ),
            ));
        }
        pixels.reserve(bytes.len() / CIFAR_RECORD * (CIFAR_RECORD - 1));
        for record in bytes.chunks_exact(CIFAR_RECORD) {
            labels.push(i64::from(record[0]));
            pixels.extend_from_slice(&record[1..]);
        }
    }
    Ok(Dataset { name: name.to_string(), shape: CIFAR_SHAPE, pixels: Pixels::U8(pixels), labels })
}

fn read_npz(name: &str, path: &Path) -> Result<Dataset> {
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        file_error(path, format!("expected a numpy .npz (zip) archive, but it cannot be read as one ({e})"))
    })?;
    let x = read_npz_member(path, &mut archive, "x")?;
    let y = read_npz_member(path, &mut archive, "y")?;
    let n = x.shape.first().copied().unwrap_or(0);
    let (shape, pixels) = npz_images(x).map_err(|m| file_error(path, format!("array 'x': {m}")))?;
    let labels = npz_labels(y).map_err(|m| file_error(path, format!("array 'y': {m}")))?;
    if labels.len() != n {
        return Err(file_error(
            path,
            format!("'y' has {} labels but 'x' has {n} images; expected one label per image", labels.len()),
        ));
    }
    Ok(Dataset { name: name.to_string(), shape, pixels, labels })
}

/// Reads array `name` (member `name.npy`, as np.savez writes it, or a bare `name`).
fn read_npz_member<R: Read + std::io::Seek>(path: &Path, archive: &mut zip::ZipArchive<R>, name: &str) -> Result<Npy> {
    let member = npyz::npz::file_name_from_array_name(name);
    let Some(index) = archive.index_for_name(&member).or_else(|| archive.index_for_name(name)) else {
        let found: Vec<&str> = archive.file_names().collect();
        return Err(file_error(
            path,
            format!("expected an array named '{name}' (member {member}), found members [{}]", found.join(", ")),
        ));
    };
    let mut bytes = Vec::new();
    archive
        .by_index(index)
        .and_then(|mut f| f.read_to_end(&mut bytes).map_err(zip::result::ZipError::from))
        .map_err(|e| file_error(path, format!("cannot read member {member}: {e}")))?;
    parse_npy(bytes).map_err(|m| file_error(path, format!("array '{name}': {m}")))
}

/// One `.npy` member held in memory: its header as npyz parsed it, and a payload whose length
/// has been checked against the dtype and shape.
struct Npy {
    header: npyz::NpyHeader,
    /// The numpy name of the element type, e.g. "float32"; always one of [`numeric_dtype`]'s.
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    /// Where the payload starts in `bytes`.
    data_start: usize,
}

impl Npy {
    /// Decodes every element (in either byte order) as `T`, which must match the dtype exactly.
    fn into_vec<T: npyz::Deserialize>(self) -> Result<Vec<T>, String> {
        npyz::NpyFile::with_header(self.header, &self.bytes[self.data_start..])
            .into_vec()
            .map_err(|e| format!("cannot decode the {} data: {e}", self.dtype))
    }
}

/// The numpy name of the plain integer and float dtypes, the only ones a dataset array may have.
fn numeric_dtype(dtype: &npyz::DType) -> Option<&'static str> {
    use npyz::TypeChar::{Float, Int, Uint};
    let npyz::DType::Plain(type_str) = dtype else { return None };
    Some(match (type_str.type_char(), type_str.size_field()) {
        (Uint, 1) => "uint8",
        (Int, 1) => "int8",
        (Uint, 2) => "uint16",
        (Int, 2) => "int16",
        (Uint, 4) => "uint32",
        (Int, 4) => "int32",
        (Uint, 8) => "uint64",
        (Int, 8) => "int64",
        (Float, 4) => "float32",
        (Float, 8) => "float64",
        _ => return None,
    })
}

/// Parses a `.npy` file with npyz, after the checks npyz does not make: the header length is
/// checked against the bytes present (npyz allocates whatever length the file declares), and
/// the payload length against the shape (npyz would report a short payload only as an
/// unexpected end of file, and ignore trailing bytes).
fn parse_npy(mut bytes: Vec<u8>) -> Result<Npy, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if !bytes.starts_with(MAGIC) {
        let head = &bytes[..bytes.len().min(MAGIC.len())];
        return Err(format!("expected the .npy magic 93 4e 55 4d 50 59 (\\x93NUMPY), found {head:02x?}"));
    }
    let (Some(&major), Some(&minor)) = (bytes.get(6), bytes.get(7)) else {
        return Err(format!("expected a .npy version after the magic, found a {}-byte file", bytes.len()));
    };
    // Version 1.0 has a u16 header length, 2.0 and 3.0 a u32.
    let header_start = match (major, minor) {
        (1, 0) => 10,
        (2 | 3, 0) => 12,
        _ => return Err(format!("unsupported .npy version {major}.{minor}; expected 1.0, 2.0 or 3.0")),
    };
    let header_len = match bytes.get(8..header_start) {
        Some(&[a, b]) => usize::from(u16::from_le_bytes([a, b])),
        Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]) as usize,
        _ => return Err(format!("expected a .npy header length, found a {}-byte file", bytes.len())),
    };
    let header_end = header_start.saturating_add(header_len);
    let Some(text) = bytes.get_mut(header_start..header_end) else {
        return Err(format!(
            "the .npy header claims {header_len} bytes, but only {} bytes follow the length",
            bytes.len().saturating_sub(header_start)
        ));
    };
    // Python 2 numpy wrote long dimensions as `5L`, which npyz's Python-literal parser rejects;
    // numpy's own reader drops the suffix, and blanking it keeps the header length unchanged.
    for i in 1..text.len() {
        if text[i] == b'L' && text[i - 1].is_ascii_digit() {
            text[i] = b' ';
        }
    }
    let mut data = &bytes[..];
    let header = npyz::NpyHeader::from_reader(&mut data).map_err(|e| {
        format!("malformed .npy header {:?}: {e}", String::from_utf8_lossy(&bytes[header_start..header_end]))
    })?;
    let dtype = header.dtype();
    let Some(name) = numeric_dtype(&dtype) else {
        return Err(match dtype {
            npyz::DType::Plain(_) => format!("unsupported dtype {}", dtype.descr()),
            _ => "structured dtypes are not supported; expected a plain dtype such as '<f4' or '|u1'".to_string(),
        });
    };
    // npyz returns Fortran-order elements in file order, so reading them as C order would
    // silently transpose the images.
    if header.order() == npyz::Order::Fortran {
        return Err("fortran_order is True; expected a C-order array (save np.ascontiguousarray(a))".into());
    }
    let shape = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is too large")))
        .collect::<Result<Vec<usize>, String>>()?;
    let expected = element_count(&shape)
        .and_then(|n| n.checked_mul(dtype.num_bytes()?))
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    let found = data.len();
    if found != expected {
        return Err(format!("expected {expected} bytes of {name} data for shape {shape:?}, found {found}"));
    }
    let data_start = bytes.len() - found;
    Ok(Npy { header, dtype: name, shape, bytes, data_start })
}

/// Converts array `x` (N x C x H x W, or N x H x W with C = 1) into a sample shape and pixels.
fn npz_images(x: Npy) -> Result<([usize; 3], Pixels), String> {
    let shape = match *x.shape.as_slice() {
        [_, h, w] => [1, h, w],
        [_, c, h, w] => [c, h, w],
        _ => {
            return Err(format!(
                "expected shape N x C x H x W or N x H x W, found {} dimensions {:?}",
                x.shape.len(),
                x.shape
            ))
        }
    };
    let pixels = match x.dtype {
        "uint8" => Pixels::U8(x.into_vec()?),
        "float32" => Pixels::F32(x.into_vec()?),
        // float64 pixels are narrowed: model inputs are float32 anyway.
        "float64" => Pixels::F32(x.into_vec::<f64>()?.into_iter().map(|v| v as f32).collect()),
        other => return Err(format!("expected dtype uint8, float32 or float64, found {other}")),
    };
    Ok((shape, pixels))
}

/// Converts array `y` (N, or N x 1 as Keras saves CIFAR labels) of integers into labels.
fn npz_labels(y: Npy) -> Result<Vec<i64>, String> {
    const INTEGER_DTYPES: &str = "uint8, int8, uint16, int16, uint32, int32, int64";
    fn widen<T: npyz::Deserialize + Into<i64>>(y: Npy) -> Result<Vec<i64>, String> {
        Ok(y.into_vec::<T>()?.into_iter().map(Into::into).collect())
    }
    if !matches!(*y.shape.as_slice(), [_] | [_, 1]) {
        return Err(format!("expected a 1-dimensional label array (N or N x 1), found shape {:?}", y.shape));
    }
    match y.dtype {
        "uint8" => widen::<u8>(y),
        "int8" => widen::<i8>(y),
        "uint16" => widen::<u16>(y),
        "int16" => widen::<i16>(y),
        "uint32" => widen::<u32>(y),
        "int32" => widen::<i32>(y),
        "int64" => y.into_vec(),
        other => Err(format!("expected an integer dtype ({INTEGER_DTYPES}), found {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

    fn data(name: &str) -> PathBuf {
        Path::new(DATA).join(name)
    }

    fn tiny_idx_spec() -> String {
        format!("idx:{},{}", data("tiny-images-idx3-ubyte.gz").display(), data("tiny-labels-idx1-ubyte.gz").display())
    }

    fn u8_pixels(ds: &Dataset) -> &[u8] {
        match &ds.pixels {
            Pixels::U8(p) => p,
            Pixels::F32(_) => panic!("expected u8 pixels"),
        }
    }

    fn f32_pixels(ds: &Dataset) -> &[f32] {
        match &ds.pixels {
            Pixels::F32(p) => p,
            Pixels::U8(_) => panic!("expected f32 pixels"),
        }
    }

    fn gunzip(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(path).unwrap()).read_to_end(&mut out).unwrap();
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn dataset_error(result: Result<Dataset>) -> String {
        match result {
            Err(Error::Dataset(message)) => message,
            other => panic!("expected Error::Dataset, got {other:?}"),
        }
    }

    /// A `.npy` file (version 1.0) with this header dict and payload.
    fn npy(header: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&u16::try_from(header.len()).unwrap().to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn write_npz(path: &Path, members: &[(&str, Vec<u8>)]) {
        let mut zip = zip::ZipWriter::new(fs::File::create(path).unwrap());
        for (name, bytes) in members {
            let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    #[test]
    fn idx_reads_tiny_images_and_labels() {
        let ds = Dataset::open(&tiny_idx_spec(), None).unwrap();
        assert_eq!(ds.len(), 5);
        assert!(!ds.is_empty());
        assert_eq!(ds.shape, [1, 4, 4]);
        assert_eq!(ds.sample_len(), 16);
        assert_eq!(ds.labels, [0, 1, 2, 3, 2]);
        let px = u8_pixels(&ds);
        assert_eq!(px.len(), 80);
        assert_eq!(&px[..4], &[78, 204, 64, 34]);
        assert_eq!(&px[76..], &[92, 195, 51, 159]);
    }

    #[test]
    fn idx_accepts_uncompressed_files() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images.idx");
        let labels = dir.path().join("labels.idx");
        fs::write(&images, gunzip(&data("tiny-images-idx3-ubyte.gz"))).unwrap();
        fs::write(&labels, gunzip(&data("tiny-labels-idx1-ubyte.gz"))).unwrap();
        let raw = Dataset::open(&format!("idx:{},{}", images.display(), labels.display()), None).unwrap();
        let gz = Dataset::open(&tiny_idx_spec(), None).unwrap();
        assert_eq!(raw.pixels, gz.pixels);
        assert_eq!(raw.labels, gz.labels);
    }

    #[test]
    fn npz_stored_float_is_idx_over_255() {
        let idx = Dataset::open(&tiny_idx_spec(), None).unwrap();
        let spec = data("tiny.npz").display().to_string();
        let ds = Dataset::open(&spec, None).unwrap();
        assert_eq!(ds.name, spec);
        assert_eq!(ds.shape, [1, 4, 4]);
        assert_eq!(ds.labels, [0, 1, 2, 3, 2]);
        let px = f32_pixels(&ds);
        assert_eq!(px.len(), 80);
        for (&f, &u) in px.iter().zip(u8_pixels(&idx)) {
            assert!((f - f32::from(u) / 255.0).abs() < 1e-6, "{f} vs {u}/255");
        }
    }

    #[test]
    fn npz_deflated_nchw_u8_matches_idx() {
        let idx = Dataset::open(&tiny_idx_spec(), None).unwrap();
        let ds = Dataset::open(&format!("npz:{}", data("tiny-nchw-u8.npz").display()), None).unwrap();
        assert_eq!(ds.shape, [1, 4, 4]);
        assert_eq!(ds.labels, [0, 1, 2, 3, 2]);
        assert_eq!(u8_pixels(&ds), u8_pixels(&idx));
    }

    #[test]
    fn npz_missing_member_names_what_was_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("only-x.npz");
        let header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 2, 2), }";
        write_npz(&path, &[("x.npy", npy(header, &[1, 2, 3, 4]))]);
        let message = dataset_error(Dataset::open(&path.display().to_string(), None));
        assert!(message.contains("'y'") && message.contains("x.npy"), "{message}");
    }

    #[test]
    fn npz_label_count_mismatch_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mismatch.npz");
        let x = npy("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 1, 2), }", &[1, 2, 3, 4]);
        let y = npy("{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }", &[0, 1, 2]);
        write_npz(&path, &[("x.npy", x), ("y.npy", y)]);
        let message = dataset_error(Dataset::open(&path.display().to_string(), None));
        assert!(message.contains("3 labels") && message.contains("2 images"), "{message}");
    }

    /// One image label, 0, as a `y` member to pair with a one-image `x`.
    fn one_label() -> Vec<u8> {
        npy("{'descr': '|u1', 'fortran_order': False, 'shape': (1,), }", &[0])
    }

    /// The dataset error for an archive holding these `x.npy` and `y.npy` members.
    fn npz_error(x: Vec<u8>, y: Vec<u8>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.npz");
        write_npz(&path, &[("x.npy", x), ("y.npy", y)]);
        dataset_error(Dataset::open(&path.display().to_string(), None))
    }

    #[test]
    fn npy_header_versions_and_literals() {
        let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (2L,), }   \n";
        let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
        v2.extend_from_slice(&u32::try_from(header.len()).unwrap().to_le_bytes());
        v2.extend_from_slice(header.as_bytes());
        v2.extend_from_slice(&[7, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.npz");
        let x = npy("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 1, 1), }", &[5, 6]);
        write_npz(&path, &[("x.npy", x), ("y.npy", v2)]);
        let ds = Dataset::open(&path.display().to_string(), None).unwrap();
        assert_eq!(ds.labels, [7, -1]);
        assert_eq!(ds.shape, [1, 1, 1]);
        assert_eq!(u8_pixels(&ds), [5, 6]);
        // A double-quoted header of a 0-dimensional array parses; only its rank is then wrong.
        let scalar = npy("{\"descr\": \"<f8\", \"fortran_order\": False, \"shape\": ()}", &[0; 8]);
        let message = npz_error(scalar, one_label());
        assert!(message.contains("array 'x'") && message.contains("found 0 dimensions []"), "{message}");
    }

    #[test]
    fn npy_reads_big_endian_arrays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big-endian.npz");
        let mut pixels = 1.5f32.to_be_bytes().to_vec();
        pixels.extend_from_slice(&(-2.25f32).to_be_bytes());
        let x = npy("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 1, 1), }", &pixels);
        let y =
            npy("{'descr': '>i4', 'fortran_order': False, 'shape': (2, 1), }", &[0, 0, 1, 2, 0xff, 0xff, 0xff, 0xfd]);
        write_npz(&path, &[("x.npy", x), ("y.npy", y)]);
        let ds = Dataset::open(&path.display().to_string(), None).unwrap();
        assert_eq!(f32_pixels(&ds), [1.5, -2.25]);
        assert_eq!(ds.labels, [258, -3]);
    }

    #[test]
    fn npy_rejects_fortran_order_and_bad_input() {
        let fortran =
            npz_error(npy("{'descr': '<f4', 'fortran_order': True, 'shape': (1, 1, 1), }", &[0; 4]), one_label());
        assert!(fortran.contains("array 'x'") && fortran.contains("fortran_order"), "{fortran}");
        let short =
            npz_error(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 1), }", &[0; 4]), one_label());
        assert!(short.contains("expected 8 bytes") && short.contains("found 4"), "{short}");
        let structured = npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1, 1, 1), }", &[0; 4]);
        assert!(npz_error(structured, one_label()).contains("structured"));
        let complex =
            npz_error(npy("{'descr': '<c8', 'fortran_order': False, 'shape': (1, 1, 1), }", &[0; 8]), one_label());
        assert!(complex.contains("unsupported dtype '<c8'"), "{complex}");
        let u64_labels = npy("{'descr': '<u8', 'fortran_order': False, 'shape': (1,), }", &[0; 8]);
        let x = npy("{'descr': '|u1', 'fortran_order': False, 'shape': (1, 1, 1), }", &[0]);
        let message = npz_error(x, u64_labels);
        assert!(
            message.contains("array 'y'") && message.contains("integer dtype") && message.contains("uint64"),
            "{message}"
        );
        let bad = |x: &[u8]| npz_error(x.to_vec(), one_label());
        assert!(bad(b"\x93NUMPY\x04\x00\x00\x00").contains("version 4.0"));
        assert!(bad(b"PK\x03\x04").contains("magic"));
        assert!(bad(b"\x93NUMPY\x01\x00\xff\x00{").contains("claims 255 bytes"));
        assert!(bad(b"\x93NUMPY\x02\x00\xff\xff\xff\xff{").contains("claims 4294967295 bytes"));
        assert!(bad(&npy("{'descr': '<f4', 'shape': (1,", &[])).contains("malformed"));
        // Dimensions whose product overflows: an error, not a panic, in every build.
        let huge = bad(&npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 2), }", &[]));
        assert!(huge.contains("array 'x'") && huge.contains("too large"), "{huge}");
    }

    #[test]
    fn cifar_batch_file_reads_labels_and_planes() {
        let spec = format!("cifar10:{}", data("tiny-cifar.bin").display());
        let ds = Dataset::open(&spec, None).unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.shape, [3, 32, 32]);
        assert_eq!(ds.labels, [4, 5, 6]);
        let px = u8_pixels(&ds);
        let plane = 32 * 32;
        for i in 0..3u8 {
            let sample = &px[usize::from(i) * 3 * plane..][..3 * plane];
            assert!(sample[..plane].iter().all(|&v| v == 10 * i));
            assert!(sample[plane..2 * plane].iter().all(|&v| v == 100 + i));
            assert!(sample[2 * plane..].iter().all(|&v| v == 200 + i));
        }
    }

    #[test]
    fn cifar_splits_read_from_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let batch = fs::read(data("tiny-cifar.bin")).unwrap();
        fs::write(dir.path().join("test_batch.bin"), &batch).unwrap();
        let nested = dir.path().join(CIFAR_TARBALL_DIR);
        fs::create_dir(&nested).unwrap();
        for i in 1..=5 {
            fs::write(nested.join(format!("data_batch_{i}.bin")), &batch).unwrap();
        }
        let test = Dataset::open("cifar10:test", Some(dir.path())).unwrap();
        assert_eq!(test.len(), 3);
        let train = Dataset::open("cifar10:train", Some(dir.path())).unwrap();
        assert_eq!(train.len(), 15);
        assert_eq!(train.labels[12..], [4, 5, 6]);
        assert_eq!(train.name, "cifar10:train");
        let message = dataset_error(Dataset::open("cifar10:test", None));
        assert!(message.contains("--data-dir"), "{message}");
    }

    #[test]
    fn cifar_size_not_multiple_of_record_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.bin");
        let mut batch = fs::read(data("tiny-cifar.bin")).unwrap();
        batch.truncate(2 * CIFAR_RECORD + 100);
        fs::write(&path, &batch).unwrap();
        let message = dataset_error(Dataset::open(&format!("cifar10:{}", path.display()), None));
        assert!(message.contains("6246 bytes") && message.contains("3073"), "{message}");
        assert!(message.contains("short.bin"), "{message}");
    }

    #[test]
    fn write_normalised_u8_applies_scale_mean_and_std_per_channel() {
        let ds = Dataset::open(&format!("cifar10:{}", data("tiny-cifar.bin").display()), None).unwrap();
        let mut out = vec![0.0; ds.sample_len()];
        ds.write_normalised(2, 0.5, &[1.0, 2.0, 3.0], &[2.0, 4.0, 8.0], &mut out);
        let plane = 32 * 32;
        // Sample 2 has planes 20, 102, 202.
        assert_eq!(out[0], (20.0 * 0.5 - 1.0) / 2.0);
        assert_eq!(out[plane + 5], (102.0 * 0.5 - 2.0) / 4.0);
        assert_eq!(out[3 * plane - 1], (202.0 * 0.5 - 3.0) / 8.0);
    }

    #[test]
    fn write_normalised_f32_ignores_scale_and_broadcasts_one_entry() {
        let ds = Dataset::open(&data("tiny.npz").display().to_string(), None).unwrap();
        let mut out = vec![0.0; 16];
        ds.write_normalised(1, 1000.0, &[0.25], &[0.5], &mut out);
        let px = f32_pixels(&ds);
        for (k, &o) in out.iter().enumerate() {
            assert_eq!(o, (px[16 + k] - 0.25) / 0.5);
        }
    }

    #[test]
    fn truncate_and_select_keep_pixels_and_labels_together() {
        let full = Dataset::open(&tiny_idx_spec(), None).unwrap();
        let picked = full.select(&[3, 0, 3]);
        assert_eq!(picked.labels, [3, 0, 3]);
        assert_eq!(u8_pixels(&picked)[..16], u8_pixels(&full)[48..64]);
        assert_eq!(u8_pixels(&picked)[16..32], u8_pixels(&full)[..16]);
        let mut ds = full.clone();
        ds.truncate(10);
        assert_eq!(ds, full);
        ds.truncate(2);
        assert_eq!(ds.labels, [0, 1]);
        assert_eq!(u8_pixels(&ds), &u8_pixels(&full)[..32]);
        ds.truncate(0);
        assert!(ds.is_empty());
    }

    #[test]
    fn truncated_idx_reports_expected_and_found_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("truncated-images.gz");
        let raw = gunzip(&data("tiny-images-idx3-ubyte.gz"));
        fs::write(&images, gzip(&raw[..raw.len() - 10])).unwrap();
        let labels = data("tiny-labels-idx1-ubyte.gz");
        let message = dataset_error(Dataset::open(&format!("idx:{},{}", images.display(), labels.display()), None));
        assert!(message.contains("truncated-images.gz"), "{message}");
        assert!(message.contains("expected 80 bytes") && message.contains("found 70"), "{message}");

        // A cut gzip stream is reported too, not silently read short.
        let full_gz = fs::read(data("tiny-images-idx3-ubyte.gz")).unwrap();
        fs::write(&images, &full_gz[..full_gz.len() / 2]).unwrap();
        let message = dataset_error(Dataset::open(&format!("idx:{},{}", images.display(), labels.display()), None));
        assert!(message.contains("gzip"), "{message}");
    }

    #[test]
    fn bad_idx_magic_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("bad-magic");
        let mut raw = gunzip(&data("tiny-images-idx3-ubyte.gz"));
        raw[0] = 0x12;
        fs::write(&images, &raw).unwrap();
        let labels = data("tiny-labels-idx1-ubyte.gz");
        let message = dataset_error(Dataset::open(&format!("idx:{},{}", images.display(), labels.display()), None));
        assert!(
            message.contains("bad-magic") && message.contains("magic") && message.contains("12 00 08 03"),
            "{message}"
        );
    }

    #[test]
    fn label_image_count_mismatch_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let labels = dir.path().join("four-labels");
        fs::write(&labels, [0, 0, 8, 1, 0, 0, 0, 4, 0, 1, 2, 3]).unwrap();
        let images = data("tiny-images-idx3-ubyte.gz");
        let message = dataset_error(Dataset::open(&format!("idx:{},{}", images.display(), labels.display()), None));
        assert!(message.contains("4 labels") && message.contains("5 images"), "{message}");
    }

    #[test]
    fn idx_rank_is_checked() {
        let labels = data("tiny-labels-idx1-ubyte.gz");
        let images = data("tiny-images-idx3-ubyte.gz");
        let swapped = dataset_error(Dataset::open(&format!("idx:{},{}", labels.display(), images.display()), None));
        assert!(swapped.contains("3-dimensional") && swapped.contains("found 1 dimensions"), "{swapped}");
        let both = dataset_error(Dataset::open(&format!("idx:{},{}", images.display(), images.display()), None));
        assert!(both.contains("1-dimensional") && both.contains("found 3 dimensions"), "{both}");
    }

    #[test]
    fn missing_fashion_mnist_dir_names_files_and_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("nowhere");
        let message = dataset_error(Dataset::open("fashion-mnist:train", Some(&absent)));
        assert!(message.contains("train-images-idx3-ubyte.gz"), "{message}");
        assert!(message.contains("train-labels-idx1-ubyte.gz"), "{message}");
        assert!(message.contains("dataset-fashion-mnist") && message.contains("--data-dir"), "{message}");
        let message = dataset_error(Dataset::open("fashion-mnist:test", Some(dir.path())));
        assert!(
            message.contains("t10k-images-idx3-ubyte.gz") && message.contains("dataset-fashion-mnist"),
            "{message}"
        );
        let message = dataset_error(Dataset::open("fashion-mnist:validation", None));
        assert!(message.contains("fashion-mnist:test"), "{message}");
    }

    #[test]
    fn unknown_spec_lists_accepted_forms() {
        let message = dataset_error(Dataset::open("mnist", None));
        for form in ["fashion-mnist:test", "idx:IMAGES,LABELS", "cifar10:test", "npz:FILE"] {
            assert!(message.contains(form), "{message}");
        }
        let message = dataset_error(Dataset::open("idx:only-one-path", None));
        assert!(message.contains("idx:IMAGES,LABELS"), "{message}");
    }

    #[test]
    fn missing_file_is_io_error_naming_it() {
        match Dataset::open("npz:/nonexistent/dir/data.npz", None) {
            Err(Error::Io { path, .. }) => assert_eq!(path, Path::new("/nonexistent/dir/data.npz")),
            other => panic!("expected Error::Io, got {other:?}"),
        }
    }

    #[test]
    fn fashion_mnist_test_from_debian_package() {
        if !Path::new(FASHION_MNIST_DIR).is_dir() {
            eprintln!("skipped: {FASHION_MNIST_DIR} is absent (dataset-fashion-mnist not installed)");
            return;
        }
        let ds = Dataset::open("fashion-mnist:test", None).unwrap();
        assert_eq!(ds.name, "fashion-mnist:test");
        assert_eq!(ds.len(), 10_000);
        assert_eq!(ds.shape, [1, 28, 28]);
        assert_eq!(u8_pixels(&ds).len(), 10_000 * 784);
        assert!(ds.labels.iter().all(|l| (0..10).contains(l)));
    }
}
