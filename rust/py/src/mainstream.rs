//! The main stream's framing and parser, over `cprfast_core::mainstream`.

use std::sync::Mutex;

use cprfast_core::Error;
use cprfast_core::mainstream::{self, Item, Need, Parser, Piece, Step};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::errors::CoreError;

/// The main-stream bytes for `pieces`, each a device section as a
/// ``(name, instance, version, payload)`` tuple or the name of a RAM section
/// (whose page stream the caller writes after these bytes); preceded by the
/// stream header with `header`, followed by the end marker counting `end`
/// sections when given. Nothing is returned (ValueError) if any piece is bad.
#[pyfunction]
#[pyo3(signature = (pieces, *, header = false, end = None))]
pub fn frame_main<'py>(
    py: Python<'py>,
    pieces: &Bound<'py, PyList>,
    header: bool,
    end: Option<u32>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut out = Vec::with_capacity(4096);
    if header {
        out.extend_from_slice(&mainstream::header());
    }
    for piece in pieces.iter() {
        if let Ok(name) = piece.cast::<PyString>() {
            mainstream::frame(&mut out, Piece::Ram { name: name.to_str()? }).map_err(CoreError)?;
            continue;
        }
        let t = piece.cast::<PyTuple>()?;
        let name = t.get_item(0)?;
        let payload = t.get_item(3)?;
        let piece = Piece::Device {
            name: name.cast::<PyString>()?.to_str()?,
            instance: t.get_item(1)?.extract()?,
            version: t.get_item(2)?.extract()?,
            payload: payload.cast::<PyBytes>()?.as_bytes(),
        };
        mainstream::frame(&mut out, piece).map_err(CoreError)?;
    }
    if let Some(sections) = end {
        mainstream::frame_end(&mut out, sections);
    }
    Ok(PyBytes::new(py, &out))
}

/// Parses a main stream from the buffers it is fed; see ``cprfast.stream.read_stream``.
#[pyclass(name = "MainStreamParser", module = "cprfast._core", frozen)]
pub struct PyMainStreamParser {
    state: Mutex<(Parser, Option<Need>)>,
}

#[pymethods]
impl PyMainStreamParser {
    #[new]
    fn new() -> Self {
        Self { state: Mutex::new((Parser::new(), None)) }
    }

    /// Parse what `data` holds of the stream: returns the verified device sections as
    /// ``(name, instance, version, payload)`` tuples (and, last, the name of a RAM section,
    /// whose page stream follows: parsing stops there), and how many bytes of `data` that took.
    fn parse<'py>(&self, py: Python<'py>, data: &[u8]) -> PyResult<(Bound<'py, PyList>, usize)> {
        let mut guard = self.state.lock().map_err(|_| CoreError(Error::Busy("main stream parser".into())))?;
        let (parser, need) = &mut *guard;
        let items = PyList::empty(py);
        let mut pos = 0;
        *need = None;
        while !parser.ended() {
            match parser.step(&data[pos..]).map_err(CoreError)? {
                Step::Item(Item::Device { name, instance, version, payload }, used) => {
                    let bytes = PyBytes::new(py, &data[pos + payload.start..pos + payload.end]);
                    items.append((name, instance, version, bytes))?;
                    pos += used;
                }
                Step::Item(Item::Ram(name), used) => {
                    items.append(name)?;
                    pos += used;
                    break;
                }
                Step::Item(_, used) => pos += used,
                Step::Need(n) => {
                    *need = Some(n);
                    break;
                }
            }
        }
        Ok((items, pos))
    }

    /// Bytes the next element still lacks after the last :meth:`parse` (0: none, or ended).
    #[getter]
    fn need(&self) -> usize {
        self.state.lock().map_or(0, |s| s.1.as_ref().map_or(0, Need::missing))
    }

    /// The end marker was parsed: the stream is complete.
    #[getter]
    fn ended(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.0.ended())
    }

    /// The input ended: raise the StreamError that says inside what (always raises).
    fn eof(&self) -> PyResult<()> {
        let s = self.state.lock().map_err(|_| CoreError(Error::Busy("main stream parser".into())))?;
        let err = match &s.1 {
            Some(need) => need.truncated(),
            None => Error::Corrupt("main stream truncated after a complete element".into()),
        };
        Err(CoreError(err).into())
    }
}
