/* The fp-qmail binary's main(): CPython's core, then fpqmail.queue.main().
 *
 * qmail execs fp-qmail once per message, so this starts only what fpqmail.queue uses
 * (docs/performance.md has the figures). fpqmail.queue is Nuitka's compilation of the
 * fpqmail package in module mode, linked into this program by build.py, which also
 * writes its tables of modules: built in, fpqmail and the few modules the core and
 * fpqmail.queue import; frozen, the import bootstrap alone. There is no other module
 * to import, and no file to import from.
 *
 * CPython starts core-only (PyConfig._init_main = 0): types, builtins, sys and the
 * frozen import bootstrap, without the main phase (path-based importer, codecs and
 * encodings, io and sys.stdout, signal handlers, warnings, site), which fpqmail.queue
 * never uses. The configuration is isolated, so the caller's PYTHON* variables, locale
 * and working directory change nothing: the binary is installed setuid and every
 * input is hostile.
 *
 * It installs no signal handler: until fpqmail.queue.main() sets its own, every signal
 * keeps the disposition the caller gave it (a full CPython start would ignore SIGPIPE
 * and SIGXFSZ), except that importing the _signal module gives SIGINT, if at its
 * default, CPython's handler (KeyboardInterrupt).
 *
 * Whatever fails before main() takes over, and any exception main() lets out, is one
 * log line (syslog, facility mail, copied to stderr) and exit 81, qmail-queue's
 * "internal bug": a temporary failure qmail retries, never a crash. A SIGINT that
 * lands before main() takes it over is exit 71, as fpqmail.queue's INTERRUPTED.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <syslog.h>
#include <unistd.h>

#define INTERRUPTED 71 /* as fpqmail.queue's: a signal before the message was taken */
#define INTERNAL 81

/* Declared in CPython's internal headers only: sets up the state the _signal module
 * needs (importing _signal without it crashes). 0: install no handler. */
extern int _PySignal_Init(int install_signal_handlers);

/* One log line in fpqmail.queue's format, then the exit code. The text is made
 * printable ASCII and cut, as fpqmail.values.printable() does with text from outside. */
_Noreturn static void log_and_exit(int code, const char *what, const char *detail) {
    char text[256];
    snprintf(text, sizeof text, "%s%s%s", what, *detail ? ": " : "", detail);
    for (char *c = text; *c; c++)
        if (*c < ' ' || *c > '~')
            *c = '?';
    openlog("fp-qmail", LOG_PID | LOG_PERROR, LOG_MAIL);
    syslog(LOG_ERR, "%s (exit %d)", text, code);
    _exit(code);
}

_Noreturn static void internal_error(const char *what, const char *detail) {
    char text[256];
    snprintf(text, sizeof text, "internal error: %s", what);
    log_and_exit(INTERNAL, text, detail);
}

/* The Python exception being raised: its type and message. A SIGINT that came while
 * fpqmail.queue was being imported (importing _signal gives SIGINT CPython's handler
 * until main() takes it over) is an interruption, as it is once main() runs. */
_Noreturn static void python_error(void) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (type && PyErr_GivenExceptionMatches(type, PyExc_KeyboardInterrupt))
        log_and_exit(INTERRUPTED, "interrupted by signal 2 at start", "");
    PyErr_NormalizeException(&type, &value, &traceback);
    PyObject *message = value ? PyObject_Str(value) : NULL;
    const char *text = message ? PyUnicode_AsUTF8(message) : NULL;
    internal_error(type ? ((PyTypeObject *)type)->tp_name : "unknown error", text ? text : "");
}

static void check(PyStatus status) {
    if (PyStatus_Exception(status))
        internal_error(status.func ? status.func : "Python start-up",
                       status.err_msg ? status.err_msg : "");
}

/* CPython's codec registry imports the encodings package the first time it is used
 * (to register its codec search function) and is unusable without it: even a
 * UnicodeDecodeError would come out as a ModuleNotFoundError. The binary has only the
 * codecs built into str and bytes (UTF-8, Latin-1, ASCII, with their error handlers),
 * so its encodings, in build.py's table of built-in modules, registers none: any other
 * codec is a LookupError. */
static struct PyModuleDef encodings = {PyModuleDef_HEAD_INIT, .m_name = "encodings"};

PyObject *PyInit_encodings(void) {
    return PyModule_Create(&encodings);
}

/* Nuitka's module init patches the inspect and types modules so that they know its
 * compiled generators and coroutines. The binary has neither module (nor any way to
 * import one), so build.py links this in the patch's place (ld --wrap). */
void __wrap_patchInspectModule(PyThreadState *tstate) {
}

/* What Nuitka's runtime asks of importlib, which a core-only start has in part.
 * - Its loader makes module specs with importlib._bootstrap.ModuleSpec, imported by
 *   that name; a full start has importlib/__init__.py register the frozen bootstrap
 *   under it. Register it the same way, in an importlib without the rest.
 * - It makes one code object through PyImport_ExecCodeModule, which passes the new
 *   module to importlib's path-based half (_bootstrap_external._fix_up_module) to set
 *   its __file__ and __spec__. A core-only start never loads that half (it would
 *   import _io and build some twenty classes): give the bootstrap one that has only
 *   _fix_up_module, setting nothing; nothing reads those attributes. */
static PyObject *fix_up_module(PyObject *self, PyObject *args) {
    Py_RETURN_NONE;
}

static PyMethodDef external_methods[] = {
    {"_fix_up_module", fix_up_module, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static int prepare_importlib(void) {
    PyObject *bootstrap = PyImport_ImportModule("_frozen_importlib");
    PyObject *external = PyModule_New("_frozen_importlib_external");
    PyObject *importlib = PyModule_New("importlib");
    PyObject *modules = PyImport_GetModuleDict();
    return bootstrap && external && importlib
        && PyModule_AddFunctions(external, external_methods) == 0
        && PyObject_SetAttrString(bootstrap, "_bootstrap_external", external) == 0
        && PyObject_SetAttrString(importlib, "_bootstrap", bootstrap) == 0
        && PyDict_SetItemString(modules, "importlib", importlib) == 0
        && PyDict_SetItemString(modules, "importlib._bootstrap", bootstrap) == 0;
}

int main(void) {
    PyPreConfig preconfig;
    PyPreConfig_InitIsolatedConfig(&preconfig);
    preconfig.utf8_mode = 1; /* file names are bytes decoded as UTF-8, whatever LANG says */
    check(Py_PreInitialize(&preconfig));

    PyConfig config;
    PyConfig_InitIsolatedConfig(&config); /* no environment, no signal handlers */
    config.site_import = 0;
    config._init_main = 0;
    check(Py_InitializeFromConfig(&config));
    PyConfig_Clear(&config);

    if (_PySignal_Init(0) < 0 || !prepare_importlib())
        python_error();
    PyObject *queue = PyImport_ImportModule("fpqmail.queue");
    if (!queue || !PyObject_CallMethod(queue, "main", NULL))
        python_error();
    internal_error("fpqmail.queue.main() returned", "");
}
