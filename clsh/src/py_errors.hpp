// C++ -> Python exception translation for the Cython binding (used as `except +translate_error`).
//
// Cython's default mapping has no way to raise MemoryError with a message, and a result
// too large for RAM must say which knob to turn, so translate by hand.
#pragma once

#include <Python.h>

#include <new>
#include <stdexcept>

#include "lsh_tables.hpp"

namespace clsh {

// Called inside a catch(...) block by Cython-generated code: rethrow to inspect the type.
inline int translate_error() {
  try {
    throw;
  } catch (const OutputTooLarge& e) {
    PyErr_SetString(PyExc_MemoryError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_SetString(PyExc_MemoryError, "clsh: out of memory");
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "clsh: unknown C++ exception");
  }
  return 0;
}

}  // namespace clsh
