/* prep's per-member tar work in C, each a twin of a Python version that runs where this was not built:
 * - scan: a plain tar's Samples, as tar._plain_scan makes them from tar_bulk.walk_plain (the header chain
 *   followed with one pread a window, then checksums, field shapes and names checked) and
 *   tar._group_plain, decline for decline, at ~2 us a member instead of ~6;
 * - layout: a bulk shard's headers and columns (tar._bulk_columns);
 * - fill_members: one block of the bulk writer (tar._BlockSink._fill_block);
 * - read_spans: a loader batch's samples read into one buffer (sources.ShardReader._read_local);
 * - sample_members: the members of each sample of such a buffer (loaders.io.members.member_spans);
 * - batch_columns: such a batch's members as columns, text and JSON decoded (loaders.io.decode);
 * - jpeg_size: a JPEG's height and width from its frame header (loaders.io.images.jpeg_size).
 * The GIL is released while reading, so threads walking or filling from several tars overlap. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sys/uio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BLOCK 512
#define WINDOW (16 * BLOCK)
#define RUN_GAP 4096     /* tar.BULK_GAP: members at most this far apart in a source share one read */
#define RUN_MEMBERS 500  /* members per preadv: two buffers each, under IOV_MAX (1024) */

typedef struct {
    char *data;
    size_t len, cap;
} Buf;

static int buf_add(Buf *b, const void *src, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64 * BLOCK;
        while (cap < b->len + n) cap *= 2;
        char *p = realloc(b->data, cap);
        if (!p) return -1;
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static int add_i64(Buf *b, int64_t v) { return buf_add(b, &v, sizeof v); }

/* A fixed-width octal field as tar_bulk accepts it: one or more digits, then only NULs or spaces; its
 * value, or -1 (declined). */
static int64_t octal(const unsigned char *f, int width) {
    int64_t v = 0;
    int i = 0;
    while (i < width && f[i] >= '0' && f[i] <= '7') v = v * 8 + (f[i++] - '0');
    if (i == 0) return -1;
    for (; i < width; i++)
        if (f[i] != 0 && f[i] != ' ') return -1;
    return v;
}

/* One pax record that changes nothing prep reads: "LEN KEY=VALUE\n", LEN (1-3 digits, no leading zero)
 * equal to the record's length `n`, KEY a time or an owner, no newline inside VALUE. */
static int harmless_pax(const unsigned char *r, int64_t n) {
    static const char *keys[] = {"mtime", "atime", "ctime", "uid", "gid", "uname", "gname"};
    int64_t len = 0;
    int i = 0;
    if (n < 1 || r[0] < '1' || r[0] > '9') return 0;
    while (i < 3 && i < n && r[i] >= '0' && r[i] <= '9') len = len * 10 + (r[i++] - '0');
    if (len != n || i >= n || r[i] != ' ') return 0;
    i++;
    int matched = 0;
    for (size_t k = 0; k < sizeof keys / sizeof *keys; k++) {
        size_t kl = strlen(keys[k]);
        if (i + (int64_t)kl < n && memcmp(r + i, keys[k], kl) == 0 && r[i + kl] == '=') {
            i += (int)kl + 1;
            matched = 1;
            break;
        }
    }
    if (!matched) return 0;
    for (; i < n - 1; i++)
        if (r[i] == '\n') return 0;
    return r[n - 1] == '\n';
}

/* The header's checksum field holds the sum of its bytes, the field itself counted as eight spaces. */
static int checksum_holds(const unsigned char *h) {
    uint32_t sum = 8 * ' ';
    for (int i = 0; i < BLOCK; i++) sum += h[i]; /* one branch-free loop the compiler vectorises */
    for (int i = 148; i < 156; i++) sum -= h[i];
    return octal(h + 148, 8) == (int64_t)sum;
}

/* The size field, all 12 bytes, says `size` (the walk read its first 11). */
static int size_holds(const unsigned char *h, int64_t size) { return octal(h + 124, 12) == size; }

static int is_word(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

/* The plain name rule of prep/formats/names.py, PLAIN_KEY "." PLAIN_EXT: key parts of [A-Za-z0-9_-]
 * joined by single slashes, not starting with "__", a dot, then [A-Za-z0-9_.-]+; the name ends at its
 * first NUL and only NULs follow it. Returns the name's length, or -1. */
static int plain_name(const unsigned char *n) {
    int len = 0;
    while (len < 100 && n[len]) len++;
    for (int i = len; i < 100; i++)
        if (n[i]) return -1;
    if (len >= 2 && n[0] == '_' && n[1] == '_') return -1;
    int i = 0, part = 0;
    for (; i < len && n[i] != '.'; i++) {
        if (n[i] == '/') {
            if (!part) return -1;
            part = 0;
        } else if (is_word(n[i])) {
            part++;
        } else {
            return -1;
        }
    }
    if (!part || i >= len - 1) return -1; /* an empty last key part, no dot, or nothing after it */
    for (i++; i < len; i++)
        if (!is_word(n[i]) && n[i] != '.') return -1;
    return len;
}

/* A member header passes: size field, checksum, no ustar name prefix, a plain name. */
static int member_holds(const unsigned char *h, int64_t size) {
    if (!size_holds(h, size) || !checksum_holds(h)) return 0;
    if (memcmp(h + 257, "ustar\0", 6) == 0)
        for (int i = 345; i < 500; i++)
            if (h[i]) return 0;
    return plain_name(h) > 0;
}

typedef struct {
    Buf starts, headers, sizes, names, name_lens;
    int64_t end;
    int err; /* an errno from pread, else 0 */
} Walk;

/* 1: a plain chain, collected; 0: declined (the exact scanner decides); -1: out of memory or I/O error */
static int walk(int fd, int64_t size, Walk *w) {
    /* headers are read a window at a time: a sample's small members (txt, json) and their headers
     * usually lie within a few KB, so one pread serves several of them */
    unsigned char win[WINDOW];
    static const unsigned char zero[BLOCK];
    int64_t p = 0, limit = size - BLOCK, wstart = 0, wend = 0;
    while (p <= limit) {
        if (p < wstart || p + 3 * BLOCK > wend) {
            ssize_t got = pread(fd, win, WINDOW, p);
            if (got < 0) {
                w->err = errno;
                return -1;
            }
            wstart = p;
            wend = p + got;
        }
        const unsigned char *buf = win + (p - wstart);
        int64_t got = wend - p < 3 * BLOCK ? wend - p : 3 * BLOCK; /* as a pread of 3 blocks at p */
        if (got < BLOCK) return 0; /* the file shrank under us */
        int64_t q = 0;
        unsigned char t = buf[156];
        if (t == 'x') {
            int64_t n = octal(buf + 124, 11);
            if (n < 0 || n > BLOCK || got != 3 * BLOCK || !harmless_pax(buf + BLOCK, n) || !size_holds(buf, n)
                || !checksum_holds(buf))
                return 0;
            q = 2 * BLOCK;
            t = buf[q + 156];
        }
        if (t == '0' || (t == 0 && buf[q] != 0)) {
            int64_t n = octal(buf + q + 124, 11);
            if (n < 0 || !member_holds(buf + q, n)) return 0;
            if (add_i64(&w->starts, p) || add_i64(&w->headers, p + q) || add_i64(&w->sizes, n)
                || add_i64(&w->name_lens, plain_name(buf + q)) || buf_add(&w->names, buf + q, 100))
                return -1;
            p += q + BLOCK + (n + BLOCK - 1) / BLOCK * BLOCK;
        } else if (q == 0 && memcmp(buf, zero, BLOCK) == 0) {
            break;
        } else {
            return 0;
        }
    }
    if (p > size || (limit < p && p < size)) return 0;
    w->end = p;
    return 1;
}

static void walk_free(Walk *w) {
    free(w->starts.data);
    free(w->headers.data);
    free(w->sizes.data);
    free(w->names.data);
    free(w->name_lens.data);
}

/* Walk with the GIL released: 1 walked, 0 declined, -1 with a Python error set. */
static int walk_released(int fd, int64_t size, Walk *w) {
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = walk(fd, size, w);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        if (w->err) {
            errno = w->err;
            PyErr_SetFromErrno(PyExc_OSError);
        } else {
            PyErr_NoMemory();
        }
    }
    return rc;
}

/* A Member (a 4-field tuple subclass) made as tuple.__new__ makes one: allocated, then filled. */
static PyObject *new_member(PyTypeObject *member_t, PyObject *name, int64_t header_offset, int64_t data_offset,
                            int64_t size) {
    PyObject *m = member_t->tp_alloc(member_t, 4);
    if (!m) return NULL;
    PyObject *a = PyLong_FromLongLong(header_offset), *b = PyLong_FromLongLong(data_offset),
             *c = PyLong_FromLongLong(size);
    if (!a || !b || !c) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(c);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(name);
    PyTuple_SET_ITEM(m, 0, name);
    PyTuple_SET_ITEM(m, 1, a);
    PyTuple_SET_ITEM(m, 2, b);
    PyTuple_SET_ITEM(m, 3, c);
    return m;
}

/* The walked members grouped as tar._group_plain groups them: consecutive members with one key make a
 * Sample (key, {ext: Member}, offset, end). A list, Py_None when a key repeats apart or a sample has
 * an extension twice (the exact scanner says where), or NULL on error. */
static PyObject *group(const Walk *w, PyTypeObject *member_t, PyObject *sample_t) {
    Py_ssize_t n = (Py_ssize_t)(w->sizes.len / sizeof(int64_t));
    const int64_t *starts = (const int64_t *)w->starts.data, *headers = (const int64_t *)w->headers.data,
                  *sizes = (const int64_t *)w->sizes.data, *lens = (const int64_t *)w->name_lens.data;
    PyObject *samples = PyList_New(0), *seen = PySet_New(NULL), *key = NULL, *members = NULL;
    PyObject *result = NULL;
    const char *cur = NULL;
    Py_ssize_t cur_len = 0;
    int64_t offset = 0, end = 0;
    if (!samples || !seen) goto fail;
    for (Py_ssize_t i = 0; i <= n; i++) {
        const char *name = i < n ? w->names.data + 100 * i : NULL;
        Py_ssize_t len = i < n ? (Py_ssize_t)lens[i] : 0;
        Py_ssize_t klen = i < n ? (Py_ssize_t)((const char *)memchr(name, '.', (size_t)len) - name) : 0;
        if (cur && (i == n || klen != cur_len || memcmp(name, cur, (size_t)klen) != 0)) {
            PyObject *sample = PyObject_CallFunction(sample_t, "OOLL", key, members, (long long)offset,
                                                     (long long)end);
            if (!sample || PyList_Append(samples, sample) < 0) {
                Py_XDECREF(sample);
                goto fail;
            }
            Py_DECREF(sample);
            Py_CLEAR(key);
            Py_CLEAR(members);
            cur = NULL;
        }
        if (i == n) break;
        if (!cur) {
            key = PyUnicode_DecodeASCII(name, klen, NULL);
            if (!key) goto fail;
            int dup = PySet_Contains(seen, key);
            if (dup < 0 || (!dup && PySet_Add(seen, key) < 0)) goto fail;
            if (dup) goto declined;
            members = PyDict_New();
            if (!members) goto fail;
            cur = name;
            cur_len = klen;
            offset = starts[i];
        }
        PyObject *full = PyUnicode_DecodeASCII(name, len, NULL);
        PyObject *ext = PyUnicode_DecodeASCII(name + klen + 1, len - klen - 1, NULL);
        PyObject *member = full ? new_member(member_t, full, starts[i], headers[i] + BLOCK, sizes[i]) : NULL;
        Py_XDECREF(full);
        int twice = ext && member ? PyDict_Contains(members, ext) : -1;
        if (twice == 0) twice = PyDict_SetItem(members, ext, member) < 0 ? -1 : 0;
        Py_XDECREF(ext);
        Py_XDECREF(member);
        if (twice < 0) goto fail;
        if (twice) goto declined;
        end = headers[i] + BLOCK + (sizes[i] + BLOCK - 1) / BLOCK * BLOCK;
    }
    result = samples;
    samples = NULL;
    goto done;
declined:
    result = Py_NewRef(Py_None);
    goto done;
fail:
    result = NULL;
done:
    Py_XDECREF(samples);
    Py_XDECREF(seen);
    Py_XDECREF(key);
    Py_XDECREF(members);
    return result;
}

PyDoc_STRVAR(scan_doc, "scan(fd, size, Member, Sample) -> (samples, end) or None\n\n"
                       "A plain tar's samples, as tar._plain_scan makes them from the walk, or None where the\n"
                       "walk or the grouping declines.");

static PyObject *scan_tar(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd;
    long long size;
    PyObject *member_t, *sample_t;
    if (!PyArg_ParseTuple(args, "iLO!O:scan", &fd, &size, &PyType_Type, &member_t, &sample_t)) return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)member_t, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "Member must be a tuple type");
        return NULL;
    }
    Walk w;
    memset(&w, 0, sizeof w);
    int rc = walk_released(fd, (int64_t)size, &w);
    PyObject *out = NULL;
    if (rc == 0) {
        out = Py_NewRef(Py_None);
    } else if (rc > 0) {
        PyObject *samples = group(&w, (PyTypeObject *)member_t, sample_t);
        if (samples == Py_None) {
            out = samples;
        } else if (samples) {
            out = Py_BuildValue("(NL)", samples, (long long)w.end);
        }
    }
    walk_free(&w);
    return out;
}

/* ------------------------------------------------------------------------------------------ layout */

static void put_octal(unsigned char *to, int digits, int64_t v) {
    for (int i = digits - 1; i >= 0; i--, v >>= 3) to[i] = (unsigned char)('0' + (v & 7));
}

PyDoc_STRVAR(layout_doc,
             "layout(items, FileSlice, template) -> (headers, paths, src, offsets, sizes, counts) or None\n\n"
             "tar._bulk_members for items [(key, {ext: FileSlice})]: every member's 512-byte header (from the\n"
             "template: name, %011o size, checksum, as tarfile writes them) in key-then-extension order, the\n"
             "source paths, and int64 arrays (as bytes) of source index, data offset and size per member\n"
             "and member count per sample. None when a member is not a FileSlice, or a name is not plain.");

static PyObject *layout(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *items, *slice_t, *o_template;
    if (!PyArg_ParseTuple(args, "O!OO:layout", &PyList_Type, &items, &slice_t, &o_template)) return NULL;
    Py_buffer template;
    if (PyObject_GetBuffer(o_template, &template, PyBUF_SIMPLE) < 0) return NULL;
    if (template.len != BLOCK) {
        PyBuffer_Release(&template);
        PyErr_SetString(PyExc_ValueError, "template: one 512-byte header is needed");
        return NULL;
    }
    Buf headers = {0}, src = {0}, offsets = {0}, sizes = {0}, counts = {0};
    PyObject *path_ids = PyDict_New(), *paths = PyList_New(0), *exts = NULL, *result = NULL;
    int declined = 0;
    unsigned char name[101], h[BLOCK];
    if (!path_ids || !paths) goto done;
    Py_ssize_t n_items = PyList_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n_items && !declined; i++) {
        PyObject *item = PyList_GET_ITEM(items, i), *key, *members;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            declined = 1;
            break;
        }
        key = PyTuple_GET_ITEM(item, 0);
        members = PyTuple_GET_ITEM(item, 1);
        Py_ssize_t klen;
        const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8AndSize(key, &klen) : NULL;
        if (!k || !PyDict_CheckExact(members) || klen >= 100 || memchr(k, '.', (size_t)klen)) {
            PyErr_Clear();
            declined = 1;
            break;
        }
        exts = PyDict_Keys(members);
        if (!exts || PyList_Sort(exts) < 0) goto done;
        Py_ssize_t n_ext = PyList_GET_SIZE(exts);
        if (add_i64(&counts, n_ext) < 0) goto nomem;
        for (Py_ssize_t e = 0; e < n_ext; e++) {
            PyObject *ext = PyList_GET_ITEM(exts, e), *sl = PyDict_GetItem(members, ext);
            Py_ssize_t elen;
            const char *x = PyUnicode_Check(ext) ? PyUnicode_AsUTF8AndSize(ext, &elen) : NULL;
            if (!x) PyErr_Clear();
            if (!x || !sl || (PyObject *)Py_TYPE(sl) != slice_t || klen + 1 + elen > 100) {
                declined = 1;
                break;
            }
            memset(name, 0, sizeof name);
            memcpy(name, k, (size_t)klen);
            name[klen] = '.';
            memcpy(name + klen + 1, x, (size_t)elen);
            long long off = PyLong_AsLongLong(PyTuple_GET_ITEM(sl, 1)),
                      size = PyLong_AsLongLong(PyTuple_GET_ITEM(sl, 2));
            if ((off == -1 || size == -1) && PyErr_Occurred()) goto done;
            if (plain_name(name) != klen + 1 + elen || size < 0 || size >= (1LL << 33) || off < 0) {
                declined = 1; /* not a plain name (plain_name also refuses a NUL inside), or a size
                                 the 11 octal digits cannot hold */
                break;
            }
            PyObject *path = PyTuple_GET_ITEM(sl, 0), *id = PyDict_GetItemWithError(path_ids, path);
            if (!id) {
                if (PyErr_Occurred()) goto done;
                id = PyLong_FromSsize_t(PyList_GET_SIZE(paths));
                int bad = !id || PyDict_SetItem(path_ids, path, id) < 0 || PyList_Append(paths, path) < 0;
                Py_XDECREF(id);
                if (bad) goto done;
                id = PyDict_GetItem(path_ids, path);
            }
            memcpy(h, template.buf, BLOCK);
            memcpy(h, name, 100);
            put_octal(h + 124, 11, size);
            h[135] = 0;
            memset(h + 148, ' ', 8);
            uint32_t sum = 0;
            for (int b = 0; b < BLOCK; b++) sum += h[b];
            put_octal(h + 148, 6, sum);
            h[154] = 0;
            if (buf_add(&headers, h, BLOCK) || add_i64(&src, PyLong_AsLongLong(id)) || add_i64(&offsets, off)
                || add_i64(&sizes, size))
                goto nomem;
        }
        Py_CLEAR(exts);
    }
    if (declined || !sizes.len) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = Py_BuildValue("(y#Oy#y#y#y#)", headers.data, (Py_ssize_t)headers.len, paths, src.data,
                           (Py_ssize_t)src.len, offsets.data, (Py_ssize_t)offsets.len, sizes.data,
                           (Py_ssize_t)sizes.len, counts.data, (Py_ssize_t)counts.len);
    goto done;
nomem:
    PyErr_NoMemory();
done:
    Py_XDECREF(exts);
    Py_XDECREF(path_ids);
    Py_XDECREF(paths);
    free(headers.data);
    free(src.data);
    free(offsets.data);
    free(sizes.data);
    free(counts.data);
    PyBuffer_Release(&template);
    return result;
}

/* ------------------------------------------------------------------------------------------ reading */

/* Read one member's data with pread until done; the bytes still missing at the source's end, or -1
 * with errno set. */
static int64_t read_all(int fd, char *to, int64_t n, int64_t offset) {
    while (n > 0) {
        ssize_t got = pread(fd, to, (size_t)n, offset);
        if (got < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (got == 0) return n;
        to += got;
        n -= got;
        offset += got;
    }
    return 0;
}

typedef struct {
    Py_buffer out, dst, fds, src, sizes, headers;
} ReadArgs;

/* What fill_members and read_spans return after read_runs: an OSError (rc < 0), (k, missing, offset)
   for a source that ended early (rc > 0), else None. */
static PyObject *read_result(int rc, int err, Py_ssize_t bad, int64_t missing, int64_t at) {
    if (rc < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (rc > 0) return Py_BuildValue("(nLL)", bad, (long long)missing, (long long)at);
    return Py_NewRef(Py_None);
}

static void release_read_args(ReadArgs *a) {
    Py_buffer *held[] = {&a->out, &a->dst, &a->fds, &a->src, &a->sizes, &a->headers};
    for (size_t k = 0; k < sizeof held / sizeof held[0]; k++)
        if (held[k]->obj) PyBuffer_Release(held[k]);
}

/* 0 when every member was read; 1 with (*bad, *missing, *at) when a source ended early; -1 on an
 * I/O error (errno set). */
static int read_runs(char *out, const int64_t *dst, const int64_t *fds, const int64_t *src, const int64_t *sizes,
                     Py_ssize_t n, Py_ssize_t *bad, int64_t *missing, int64_t *at) {
    struct iovec iov[2 * RUN_MEMBERS];
    char skip[RUN_GAP];
    Py_ssize_t k = 0;
    while (k < n) {
        /* a run: members of one source, each starting at most RUN_GAP after the last one's data */
        Py_ssize_t end = k + 1;
        int cnt = 0;
        int64_t want = sizes[k];
        iov[cnt].iov_base = out + dst[k];
        iov[cnt++].iov_len = (size_t)sizes[k];
        while (end < n && end - k < RUN_MEMBERS && fds[end] == fds[k]) {
            int64_t gap = src[end] - (src[end - 1] + sizes[end - 1]);
            if (gap < 0 || gap > RUN_GAP) break;
            iov[cnt].iov_base = skip;
            iov[cnt++].iov_len = (size_t)gap;
            iov[cnt].iov_base = out + dst[end];
            iov[cnt++].iov_len = (size_t)sizes[end];
            want += gap + sizes[end];
            end++;
        }
        ssize_t got = preadv((int)fds[k], iov, cnt, src[k]);
        if (got < 0 && errno != EINTR) return -1;
        if (got != want) { /* short or interrupted: each member of the run on its own */
            for (Py_ssize_t m = k; m < end; m++) {
                int64_t left = read_all((int)fds[m], out + dst[m], sizes[m], src[m]);
                if (left < 0) return -1;
                if (left > 0) {
                    *bad = m;
                    *missing = left;
                    *at = src[m] + sizes[m] - left;
                    return 1;
                }
            }
        }
        k = end;
    }
    return 0;
}

static int int64_buffer(PyObject *obj, Py_buffer *view, const char *what, Py_ssize_t n) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (view->itemsize != 8 || (view->format && strcmp(view->format, "q") && strcmp(view->format, "l"))
        || (n >= 0 && view->len / 8 != n)) {
        PyErr_Format(PyExc_ValueError, "%s: an int64 array of the members' length is needed", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The buffers of a read: the writable output and the four int64 columns (dst, fds, src, sizes), all of
   one length. That length, or -1 with the error set (the buffers got so far are released by
   release_read_args). */
static Py_ssize_t get_spans(ReadArgs *a, PyObject *o_out, PyObject *o_dst, PyObject *o_fds, PyObject *o_src,
                            PyObject *o_sizes) {
    if (PyObject_GetBuffer(o_out, &a->out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0
        || int64_buffer(o_dst, &a->dst, "dst", -1) < 0)
        return -1;
    Py_ssize_t n = a->dst.len / 8;
    if (int64_buffer(o_fds, &a->fds, "fds", n) < 0 || int64_buffer(o_src, &a->src, "src", n) < 0
        || int64_buffer(o_sizes, &a->sizes, "sizes", n) < 0)
        return -1;
    return n;
}

/* The read of checked arguments, the GIL released; with headers (fill_members), each member's header
   laid just before it and zeros after it to the next block boundary. What read_result says of it. */
static PyObject *read_checked(ReadArgs *a, Py_ssize_t n) {
    const int64_t *dst = a->dst.buf, *sizes = a->sizes.buf, *src = a->src.buf;
    Py_ssize_t bad = 0;
    int64_t missing = 0, at = 0;
    int rc, err = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = read_runs(a->out.buf, dst, a->fds.buf, src, sizes, n, &bad, &missing, &at);
    err = errno;
    if (rc == 0 && a->headers.obj) {
        char *out = a->out.buf;
        const char *headers = a->headers.buf;
        for (Py_ssize_t k = 0; k < n; k++) {
            memcpy(out + dst[k] - BLOCK, headers + BLOCK * k, BLOCK);
            int64_t pad = -sizes[k] & (BLOCK - 1);
            memset(out + dst[k] + sizes[k], 0, (size_t)pad);
        }
    }
    Py_END_ALLOW_THREADS
    return read_result(rc, err, bad, missing, at);
}

PyDoc_STRVAR(fill_doc,
             "fill_members(out, dst, fds, src, sizes, headers) -> None or (k, missing, offset)\n\n"
             "Lay members out in `out`: member k's `sizes[k]` bytes read from descriptor `fds[k]` at `src[k]`\n"
             "to `dst[k]`, its 512-byte header (row k of `headers`) just before, zeros after to the next\n"
             "512-byte boundary. One preadv per run of close members of one source (tar.BULK_GAP: the pax\n"
             "and ustar headers between them go to a scratch block). None when all were read; (k, bytes\n"
             "missing, source offset) when member k's source ended early.");

static PyObject *fill_members(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *o_out, *o_dst, *o_fds, *o_src, *o_sizes, *o_headers;
    if (!PyArg_ParseTuple(args, "OOOOOO:fill_members", &o_out, &o_dst, &o_fds, &o_src, &o_sizes, &o_headers))
        return NULL;
    ReadArgs a = {0};
    PyObject *result = NULL;
    Py_ssize_t n = get_spans(&a, o_out, o_dst, o_fds, o_src, o_sizes);
    if (n < 0) goto done;
    if (PyObject_GetBuffer(o_headers, &a.headers, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (a.headers.len != n * BLOCK) {
        PyErr_SetString(PyExc_ValueError, "headers: one 512-byte row per member is needed");
        goto done;
    }
    const int64_t *dst = a.dst.buf, *sizes = a.sizes.buf, *src = a.src.buf;
    for (Py_ssize_t k = 0; k < n; k++)
        if (dst[k] < BLOCK || sizes[k] < 0 || src[k] < 0
            || dst[k] + (sizes[k] + BLOCK - 1) / BLOCK * BLOCK > a.out.len) {
            PyErr_SetString(PyExc_ValueError, "a member does not fit in the output buffer");
            goto done;
        }
    result = read_checked(&a, n);
done:
    release_read_args(&a);
    return result;
}

PyDoc_STRVAR(read_doc,
             "read_spans(out, dst, fds, src, sizes) -> None or (k, missing, offset)\n\n"
             "Read span k's `sizes[k]` bytes from descriptor `fds[k]` at `src[k]` into `out` at `dst[k]` (int64\n"
             "arrays), the GIL released: one preadv per run of close spans of one descriptor, as fill_members\n"
             "reads members. None when all were read; (k, bytes missing, source offset) when span k's source\n"
             "ended early.");

static PyObject *read_spans(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *o_out, *o_dst, *o_fds, *o_src, *o_sizes;
    if (!PyArg_ParseTuple(args, "OOOOO:read_spans", &o_out, &o_dst, &o_fds, &o_src, &o_sizes)) return NULL;
    ReadArgs a = {0};
    PyObject *result = NULL;
    Py_ssize_t n = get_spans(&a, o_out, o_dst, o_fds, o_src, o_sizes);
    if (n < 0) goto done;
    const int64_t *dst = a.dst.buf, *sizes = a.sizes.buf, *src = a.src.buf;
    for (Py_ssize_t k = 0; k < n; k++)
        if (dst[k] < 0 || sizes[k] < 0 || src[k] < 0 || dst[k] + sizes[k] > a.out.len) {
            PyErr_SetString(PyExc_ValueError, "a span does not fit in the output buffer");
            goto done;
        }
    result = read_checked(&a, n);
done:
    release_read_args(&a);
    return result;
}

/* ------------------------------------------------------------------------------------------ members */

#define EXT_CACHE 16 /* extensions remembered per call: a batch's samples share their extension strings */

typedef struct {
    PyObject *str[EXT_CACHE];
    const unsigned char *text[EXT_CACHE]; /* where the string was read: compared by content */
    int len[EXT_CACHE];
    int n;
} Exts;

/* A new reference to the str of an extension, shared with earlier members of the call. */
static PyObject *ext_str(Exts *c, const unsigned char *t, int len) {
    for (int i = 0; i < c->n; i++)
        if (c->len[i] == len && memcmp(c->text[i], t, (size_t)len) == 0) return Py_NewRef(c->str[i]);
    PyObject *s = PyUnicode_DecodeASCII((const char *)t, len, NULL);
    if (s && c->n < EXT_CACHE) {
        c->str[c->n] = Py_NewRef(s);
        c->text[c->n] = t;
        c->len[c->n++] = len;
    }
    return s;
}

/* One sample's bytes [a, b) of d: (key, {ext: (start, end)}), Py_None (declined), or NULL on error. Takes
 * exactly what member_spans takes without calling read_member_name's slow path: plain ustar members
 * (type '0' or NUL, no name prefix, an octal size) with plain names of one key, each inside the sample,
 * up to the sample's end or an all-zero block; a later member of the same extension replaces an earlier
 * one, as member_spans' dict does. Everything else is declined, for member_spans to decide. */
static PyObject *one_sample(const unsigned char *d, int64_t a, int64_t b, Exts *c) {
    static const unsigned char zero[BLOCK];
    const unsigned char *key = NULL;
    int klen = 0;
    PyObject *members = PyDict_New();
    if (!members) return NULL;
    int64_t pos = a;
    while (pos + BLOCK <= b) {
        const unsigned char *h = d + pos;
        if (memcmp(h, zero, BLOCK) == 0) break;
        if (memcmp(h + 257, "ustar", 5) != 0 || (h[156] != '0' && h[156] != 0) || h[345] || (h[124] & 0x80))
            goto declined;
        int64_t size = octal(h + 124, 12);
        int len = plain_name(h);
        if (size < 0 || len < 0) goto declined;
        int kl = (int)((const unsigned char *)memchr(h, '.', (size_t)len) - h);
        int64_t start = pos + BLOCK, end = start + size;
        if (end > b) goto declined;
        if (!key) {
            key = h;
            klen = kl;
        } else if (kl != klen || memcmp(h, key, (size_t)kl) != 0) {
            goto declined;
        }
        PyObject *ext = ext_str(c, h + kl + 1, len - kl - 1);
        PyObject *span = ext ? Py_BuildValue("(LL)", (long long)start, (long long)end) : NULL;
        int bad = !span || PyDict_SetItem(members, ext, span) < 0;
        Py_XDECREF(ext);
        Py_XDECREF(span);
        if (bad) {
            Py_DECREF(members);
            return NULL;
        }
        pos = start + (size + BLOCK - 1) / BLOCK * BLOCK;
    }
    if (!key) goto declined;
    PyObject *k = PyUnicode_DecodeASCII((const char *)key, klen, NULL);
    if (!k) {
        Py_DECREF(members);
        return NULL;
    }
    return Py_BuildValue("(NN)", k, members);
declined:
    Py_DECREF(members);
    return Py_NewRef(Py_None);
}

PyDoc_STRVAR(members_doc,
             "sample_members(buf, spans) -> list\n\n"
             "The members of each sample of a read batch (sample k: bytes spans[2k] to spans[2k+1] of buf;\n"
             "spans an int64 array), as loaders.io.members.member_spans parses a plain sample: (key, {ext:\n"
             "(start, end)}) with offsets into buf, or None where member_spans must decide (a bad record, pax\n"
             "or GNU headers, metadata members, unusual names).");

static PyObject *sample_members(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *o_buf, *o_spans, *out = NULL;
    if (!PyArg_ParseTuple(args, "OO:sample_members", &o_buf, &o_spans)) return NULL;
    Py_buffer buf, spans;
    if (PyObject_GetBuffer(o_buf, &buf, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (int64_buffer(o_spans, &spans, "spans", -1) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    Exts c;
    c.n = 0;
    const int64_t *sp = spans.buf;
    Py_ssize_t n = spans.len / 16;
    if (spans.len % 16) {
        PyErr_SetString(PyExc_ValueError, "spans: a start and an end per sample are needed");
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++)
        if (sp[2 * k] < 0 || sp[2 * k] > sp[2 * k + 1] || sp[2 * k + 1] > buf.len) {
            PyErr_SetString(PyExc_ValueError, "a sample's span is outside the buffer");
            goto done;
        }
    out = PyList_New(n);
    for (Py_ssize_t k = 0; out && k < n; k++) {
        PyObject *item = one_sample(buf.buf, sp[2 * k], sp[2 * k + 1], &c);
        if (!item) Py_CLEAR(out);
        else PyList_SET_ITEM(out, k, item);
    }
done:
    for (int i = 0; i < c.n; i++) Py_DECREF(c.str[i]);
    PyBuffer_Release(&spans);
    PyBuffer_Release(&buf);
    return out;
}

/* ------------------------------------------------------------------------------------------ columns */

enum { COL_IMAGE = 0, COL_TEXT = 1, COL_JSON = 2, COL_MAX_MEMBERS = 32 };

/* Errors a member that batch_columns declines may raise: the Python path raises them again, with the
   sample named. Anything else (memory, an interrupt) stops the call. */
static int declinable(void) {
    return PyErr_ExceptionMatches(PyExc_ValueError) || PyErr_ExceptionMatches(PyExc_StopIteration) ||
           PyErr_ExceptionMatches(PyExc_RecursionError);
}

/* A JSON member's value, as loaders.io.decode._json gives it on its direct path: plain UTF-8 text that
   is one JSON value with nothing around it, parsed by json's scanner. Py_None (a new reference) where
   that path does not apply or fails, for the Python path to decide; NULL on other errors. */
static PyObject *json_member(const unsigned char *d, Py_ssize_t n, PyObject *scan) {
    if (n == 0 || d[0] == 0xEF || d[0] == 0xFE || d[0] == 0xFF || memchr(d, 0, (size_t)(n < 4 ? n : 4)))
        return Py_NewRef(Py_None);
    PyObject *text = PyUnicode_DecodeUTF8((const char *)d, n, "surrogatepass");
    PyObject *got = text ? PyObject_CallFunction(scan, "Oi", text, 0) : NULL;
    PyObject *value = NULL;
    if (got && PyTuple_Check(got) && PyTuple_GET_SIZE(got) == 2) {
        Py_ssize_t end = PyLong_AsSsize_t(PyTuple_GET_ITEM(got, 1));
        if (end == PyUnicode_GET_LENGTH(text)) value = Py_NewRef(PyTuple_GET_ITEM(got, 0));
        else if (!PyErr_Occurred()) value = Py_NewRef(Py_None);
    } else if (got) {
        value = Py_NewRef(Py_None);
    }
    Py_XDECREF(got);
    Py_XDECREF(text);
    if (!value && declinable()) {
        PyErr_Clear();
        value = Py_NewRef(Py_None);
    }
    return value;
}

PyDoc_STRVAR(columns_doc,
             "batch_columns(view, parsed, kinds, scan) -> (keys, [(ext, values), ...]) or None\n\n"
             "A read batch's members as columns, for the loader's plain case: every item of `parsed` (what\n"
             "sample_members gives for `view`) is (key, {ext: (start, end)}) with the first sample's\n"
             "extensions, each of which `kinds` maps to 0 (image: a memoryview slice of `view`), 1 (text:\n"
             "UTF-8, undecodable bytes replaced) or 2 (JSON: one value with no whitespace around it, parsed\n"
             "by the json scanner `scan`). Columns come in the first sample's member order. None where any\n"
             "sample is not that case, for the per-sample path to decide.");

static PyObject *batch_columns(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *view, *parsed, *kinds, *scan;
    if (!PyArg_ParseTuple(args, "OO!O!O:batch_columns", &view, &PyList_Type, &parsed, &PyDict_Type, &kinds,
                          &scan))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(parsed);
    PyObject *first = n ? PyList_GET_ITEM(parsed, 0) : NULL;
    if (!first || !PyTuple_CheckExact(first) || PyTuple_GET_SIZE(first) != 2 ||
        !PyDict_CheckExact(PyTuple_GET_ITEM(first, 1)))
        Py_RETURN_NONE;
    PyObject *m0 = PyTuple_GET_ITEM(first, 1);
    Py_ssize_t nm = PyDict_GET_SIZE(m0);
    if (nm == 0 || nm > COL_MAX_MEMBERS) Py_RETURN_NONE;
    Py_buffer buf;
    if (PyObject_GetBuffer(view, &buf, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *d = buf.buf;
    PyObject *ext[COL_MAX_MEMBERS], *col[COL_MAX_MEMBERS] = {NULL};
    int kind[COL_MAX_MEMBERS];
    PyObject *keys = PyList_New(n), *out = NULL, *k_, *v_;
    Py_ssize_t pos = 0, e = 0;
    int declined = 0;
    if (!keys) goto done;
    while (PyDict_Next(m0, &pos, &k_, &v_)) {
        PyObject *code = PyDict_GetItemWithError(kinds, k_);
        if (!code) {
            declined = !PyErr_Occurred();
            goto done;
        }
        ext[e] = k_;
        kind[e] = (int)PyLong_AsLong(code);
        if ((kind[e] == -1 && PyErr_Occurred()) || !(col[e] = PyList_New(n))) goto done;
        e++;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyList_GET_ITEM(parsed, k);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyDict_CheckExact(PyTuple_GET_ITEM(item, 1)) || PyDict_GET_SIZE(PyTuple_GET_ITEM(item, 1)) != nm) {
            declined = 1;
            goto done;
        }
        PyObject *members = PyTuple_GET_ITEM(item, 1);
        for (e = 0; e < nm; e++) {
            PyObject *span = PyDict_GetItemWithError(members, ext[e]);
            if (!span || !PyTuple_CheckExact(span) || PyTuple_GET_SIZE(span) != 2) {
                declined = !PyErr_Occurred();
                goto done;
            }
            Py_ssize_t a = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 0));
            Py_ssize_t b = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 1));
            if (PyErr_Occurred()) goto done;
            if (a < 0 || a > b || b > buf.len) {
                declined = 1;
                goto done;
            }
            PyObject *value;
            if (kind[e] == COL_TEXT) {
                value = PyUnicode_DecodeUTF8((const char *)d + a, b - a, "replace");
            } else if (kind[e] == COL_JSON) {
                value = json_member(d + a, b - a, scan);
                if (value == Py_None) {
                    Py_DECREF(value);
                    declined = 1;
                    goto done;
                }
            } else {
                PyObject *slice = PySlice_New(PyTuple_GET_ITEM(span, 0), PyTuple_GET_ITEM(span, 1), NULL);
                value = slice ? PyObject_GetItem(view, slice) : NULL;
                Py_XDECREF(slice);
            }
            if (!value) goto done;
            PyList_SET_ITEM(col[e], k, value);
        }
        PyList_SET_ITEM(keys, k, Py_NewRef(PyTuple_GET_ITEM(item, 0)));
    }
    PyObject *pairs = PyList_New(nm);
    for (e = 0; pairs && e < nm; e++) PyList_SET_ITEM(pairs, e, Py_BuildValue("(OO)", ext[e], col[e]));
    for (e = 0; pairs && e < nm; e++)
        if (!PyList_GET_ITEM(pairs, e)) Py_CLEAR(pairs);
    if (pairs) out = Py_BuildValue("(ON)", keys, pairs);
done:
    for (e = 0; e < nm; e++) Py_XDECREF(col[e]);
    Py_XDECREF(keys);
    PyBuffer_Release(&buf);
    if (declined) Py_RETURN_NONE;
    return out;
}

/* ------------------------------------------------------------------------------------------ jpeg */

PyDoc_STRVAR(jpeg_doc,
             "jpeg_size(data) -> (height, width) or None\n\n"
             "A JPEG's size from its first frame header (SOF0-SOF15), read by walking the markers before it,\n"
             "as libjpeg does; None where there is none before the scan, or it says height 0 (a DNL marker).");

static PyObject *jpeg_size(PyObject *Py_UNUSED(self), PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *d = b.buf;
    Py_ssize_t n = b.len, p = 2;
    long h = -1, w = -1;
    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) goto done;
    while (p + 4 <= n) {
        if (d[p] != 0xFF) goto done; /* not a marker where one must be */
        unsigned char m = d[p + 1];
        if (m == 0xFF) { /* fill byte */
            p++;
            continue;
        }
        if (m == 0x01 || (m >= 0xD0 && m <= 0xD7)) { /* markers without a length */
            p += 2;
            continue;
        }
        if (m == 0xD8 || m == 0xD9 || m == 0xDA) goto done; /* no frame header before the image data */
        Py_ssize_t len = (Py_ssize_t)d[p + 2] << 8 | d[p + 3];
        if (len < 2 || p + 2 + len > n) goto done;
        if (m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC) {
            if (len < 8) goto done;
            h = (long)d[p + 5] << 8 | d[p + 6];
            w = (long)d[p + 7] << 8 | d[p + 8];
            if (h == 0 || w == 0) h = w = -1;
            goto done;
        }
        p += 2 + len;
    }
done:
    PyBuffer_Release(&b);
    if (h < 0) Py_RETURN_NONE;
    return Py_BuildValue("(ll)", h, w);
}

static PyMethodDef methods[] = {{"scan", scan_tar, METH_VARARGS, scan_doc},
                                {"layout", layout, METH_VARARGS, layout_doc},
                                {"fill_members", fill_members, METH_VARARGS, fill_doc},
                                {"read_spans", read_spans, METH_VARARGS, read_doc},
                                {"sample_members", sample_members, METH_VARARGS, members_doc},
                                {"batch_columns", batch_columns, METH_VARARGS, columns_doc},
                                {"jpeg_size", jpeg_size, METH_O, jpeg_doc},
                                {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_tarnative",
    .m_doc = "Native plain-tar scan, bulk layout and member reads for prep.formats.tar and the loaders.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__tarnative(void) { return PyModule_Create(&module); }
