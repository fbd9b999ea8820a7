/* An LD_PRELOAD recorder of what a process made durable in one directory tree, for the
 * power-cut suite (tests/powercut.rs). Compiled at test time with the system `cc`:
 *
 *     cc -shared -fPIC -O2 -o libpowercut.so shim.c -ldl
 *
 * Environment:
 *   TW_PC_DATA_DIR  absolute path of the tree that matters (the daemon's data dir); calls on
 *                   anything else pass through unrecorded.
 *   TW_PC_LOG_DIR   where the record goes: `events` (one line per event, appended) and
 *                   `snap/` (the snapshots the events name).
 *   TW_PC_MUTATE    optional; makes the record forget some durability points, as if the
 *                   program had not asked for them (the real call still runs):
 *                     dirsync           every fsync/fdatasync of a directory;
 *                     filesync:TEXT     every fsync/fdatasync (and O_SYNC/O_DSYNC write) of a
 *                                       regular file whose path under the tree contains TEXT.
 *                     late:NS           every sync stamped NS nanoseconds after it returned,
 *                                       as if the program had answered before its syncs
 *                                       were done.
 *                   Each forgotten call is logged as an `M` line, so a test can tell whether a
 *                   mutation applied at all.
 *
 * Events (fields separated by one space; t is CLOCK_MONOTONIC in ns, read after the real call
 * returned, so that it is earlier than anything the program did after it, such as an HTTP
 * answer; seq orders the events of one process):
 *   F t pid seq ident size snapname relpath     a regular file's content, durable from t on;
 *                                               copied before the call, so it holds every write
 *                                               that completed before the sync began
 *   D t pid seq relpath snapname                a directory's entries, durable from t on; the
 *                                               snapshot file has one line per entry:
 *                                               kind(f|d|o) ident size name
 *   S t pid seq                                 a syncfs: followed by the F and D events of
 *                                               everything under the tree, with the same t
 *   R t pid seq relpath -> relpath              a rename (informational: a cut right after it)
 *   U t pid seq relpath                         an unlink (informational)
 *   K t pid seq relpath                         a mkdir (informational)
 *   M t pid seq what relpath                    a durability point the mutation forgot
 * ident is inode:birth-time-in-ns, so that a reused inode number is another file.
 *
 * Only the libc entry points a program calls can be interposed (glibc's internal calls are
 * not); tests/powercut.rs checks with strace which calls the daemon's store makes.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_TRACKED_FD 65536

static char data_dir[PATH_MAX];
static size_t data_dir_len;
static char log_dir[PATH_MAX];
static int mutate_dirsync;
static char mutate_file[256];
static unsigned long long mutate_late;
static int active;
static int events_fd = -1;
static atomic_ulong seq_counter;
/* fds opened under the tree with O_SYNC or O_DSYNC: every write on them is durable. */
static unsigned char sync_fd[MAX_TRACKED_FD];
static pthread_mutex_t syncfs_lock = PTHREAD_MUTEX_INITIALIZER;

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_creat)(const char *, mode_t);
static int (*real_creat64)(const char *, mode_t);
static int (*real_close)(int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_syncfs)(int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned int);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_mkdir)(const char *, mode_t);

static void resolve_all(void) {
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_openat64 = dlsym(RTLD_NEXT, "openat64");
    real_creat = dlsym(RTLD_NEXT, "creat");
    real_creat64 = dlsym(RTLD_NEXT, "creat64");
    real_close = dlsym(RTLD_NEXT, "close");
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_syncfs = dlsym(RTLD_NEXT, "syncfs");
    real_rename = dlsym(RTLD_NEXT, "rename");
    real_renameat = dlsym(RTLD_NEXT, "renameat");
    real_renameat2 = dlsym(RTLD_NEXT, "renameat2");
    real_unlink = dlsym(RTLD_NEXT, "unlink");
    real_unlinkat = dlsym(RTLD_NEXT, "unlinkat");
    real_mkdir = dlsym(RTLD_NEXT, "mkdir");
}

static pthread_once_t resolved = PTHREAD_ONCE_INIT;

/* Calls can come before the constructor ran (from other libraries' constructors). */
#define REAL(name) (real_##name ? real_##name : (pthread_once(&resolved, resolve_all), real_##name))

__attribute__((constructor)) static void shim_init(void) {
    pthread_once(&resolved, resolve_all);
    const char *dd = getenv("TW_PC_DATA_DIR");
    const char *ld = getenv("TW_PC_LOG_DIR");
    if (!dd || !ld || dd[0] != '/' || strlen(dd) >= sizeof data_dir - 1 ||
        strlen(ld) >= sizeof log_dir - 64)
        return;
    strcpy(data_dir, dd);
    data_dir_len = strlen(data_dir);
    while (data_dir_len > 1 && data_dir[data_dir_len - 1] == '/')
        data_dir[--data_dir_len] = 0;
    strcpy(log_dir, ld);
    const char *m = getenv("TW_PC_MUTATE");
    if (m && strcmp(m, "dirsync") == 0)
        mutate_dirsync = 1;
    else if (m && strncmp(m, "filesync:", 9) == 0)
        snprintf(mutate_file, sizeof mutate_file, "%s", m + 9);
    else if (m && strncmp(m, "late:", 5) == 0)
        mutate_late = strtoull(m + 5, NULL, 10);
    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/events", log_dir);
    events_fd = REAL(open)(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    active = events_fd >= 0;
}

static unsigned long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

/* One event line, written with one append so that lines of threads and processes do not mix. */
static void emit(const char *fmt, ...) {
    char line[3 * PATH_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    int saved = errno;
    (void)!real_write(events_fd, line, (size_t)n);
    errno = saved;
}

/* The path of `path` under the tree ("" for the tree itself), or NULL when it is outside. */
static const char *relative(const char *path) {
    if (strncmp(path, data_dir, data_dir_len) != 0)
        return NULL;
    if (path[data_dir_len] == 0)
        return "";
    if (path[data_dir_len] != '/')
        return NULL;
    return path + data_dir_len + 1;
}

/* The current path of an open descriptor into `buf`; its part under the tree, or NULL. */
static const char *fd_relative(int fd, char *buf, size_t len) {
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(proc, buf, len - 1);
    if (n <= 0)
        return NULL;
    buf[n] = 0;
    /* A removed file is in no directory: nothing of it can survive. */
    static const char deleted[] = " (deleted)";
    if ((size_t)n >= sizeof deleted - 1 && strcmp(buf + n - (sizeof deleted - 1), deleted) == 0)
        return NULL;
    return relative(buf);
}

/* A path as given to a call (relative to dirfd or the working directory) made absolute; no
 * symlinks are resolved, which is enough for a program that names its files by absolute
 * paths under the tree. */
static const char *absolute(int dirfd, const char *path, char *buf, size_t len) {
    if (path[0] == '/')
        return path;
    char base[PATH_MAX - 256];
    if (dirfd == AT_FDCWD) {
        if (!getcwd(base, sizeof base))
            return path;
    } else {
        char proc[64];
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(proc, base, sizeof base - 1);
        if (n <= 0)
            return path;
        base[n] = 0;
    }
    snprintf(buf, len, "%s/%s", base, path);
    return buf;
}

static void ident_of(const struct statx *sx, char *out, size_t len) {
    unsigned long long birth = 0;
    if (sx->stx_mask & STATX_BTIME)
        birth = (unsigned long long)sx->stx_btime.tv_sec * 1000000000ull + sx->stx_btime.tv_nsec;
    snprintf(out, len, "%llu:%llu", (unsigned long long)sx->stx_ino, birth);
}

static int statx_fd(int fd, struct statx *sx) {
    return statx(fd, "", AT_EMPTY_PATH, STATX_INO | STATX_SIZE | STATX_TYPE | STATX_BTIME, sx);
}

/* Copies the content of regular file `src_fd` (read through a descriptor of its own, since
 * the program's may be write-only) to snap/NAME. */
static int copy_content(int src_fd, const char *name) {
    char proc[64], dest[PATH_MAX + 64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", src_fd);
    int in = REAL(open)(proc, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return -1;
    snprintf(dest, sizeof dest, "%s/snap/%s", log_dir, name);
    int out = REAL(open)(dest, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) {
        real_close(in);
        return -1;
    }
    char buf[65536];
    ssize_t n;
    off_t at = 0;
    while ((n = pread(in, buf, sizeof buf, at)) > 0) {
        if (real_write(out, buf, (size_t)n) != n)
            break;
        at += n;
    }
    real_close(in);
    real_close(out);
    return 0;
}

/* Writes the entries of directory `dir_fd` to snap/NAME. */
static int list_entries(int dir_fd, const char *name) {
    char proc[64], dest[PATH_MAX + 64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", dir_fd);
    DIR *dir = opendir(proc);
    if (!dir)
        return -1;
    snprintf(dest, sizeof dest, "%s/snap/%s", log_dir, name);
    FILE *out = NULL;
    int out_fd = REAL(open)(dest, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out_fd >= 0)
        out = fdopen(out_fd, "w");
    if (!out) {
        closedir(dir);
        return -1;
    }
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0)
            continue;
        struct statx sx;
        if (statx(dirfd(dir), entry->d_name, AT_SYMLINK_NOFOLLOW,
                  STATX_INO | STATX_SIZE | STATX_TYPE | STATX_BTIME, &sx) != 0)
            continue;
        char ident[64];
        ident_of(&sx, ident, sizeof ident);
        char kind = S_ISREG(sx.stx_mode) ? 'f' : S_ISDIR(sx.stx_mode) ? 'd' : 'o';
        fprintf(out, "%c %s %llu %s\n", kind, ident, (unsigned long long)sx.stx_size,
                entry->d_name);
    }
    closedir(dir);
    fclose(out);
    return 0;
}

static unsigned long next_seq(void) { return atomic_fetch_add(&seq_counter, 1) + 1; }

/* What a sync of `fd` under the tree is about to make durable: the file's content or the
 * directory's entries, saved before the call. */
struct pending {
    int kind; /* 0: nothing to record, 'F' or 'D' */
    unsigned long seq;
    char snap[64];
    char ident[64];
    unsigned long long size;
    char rel[PATH_MAX];
};

static void before_sync(int fd, const char *what, struct pending *p) {
    p->kind = 0;
    if (!active)
        return;
    char path[PATH_MAX];
    const char *rel = fd_relative(fd, path, sizeof path);
    if (!rel)
        return;
    struct statx sx;
    if (statx_fd(fd, &sx) != 0)
        return;
    int saved = errno;
    snprintf(p->rel, sizeof p->rel, "%s", rel[0] ? rel : ".");
    p->seq = next_seq();
    snprintf(p->snap, sizeof p->snap, "%d-%lu", (int)getpid(), p->seq);
    if (S_ISDIR(sx.stx_mode)) {
        if (mutate_dirsync) {
            emit("M %llu %d %lu %s %s", now_ns(), (int)getpid(), p->seq, what, p->rel);
        } else if (list_entries(fd, p->snap) == 0) {
            p->kind = 'D';
        }
    } else if (S_ISREG(sx.stx_mode)) {
        if (mutate_file[0] && strstr(p->rel, mutate_file)) {
            emit("M %llu %d %lu %s %s", now_ns(), (int)getpid(), p->seq, what, p->rel);
        } else if (copy_content(fd, p->snap) == 0) {
            ident_of(&sx, p->ident, sizeof p->ident);
            p->size = sx.stx_size;
            p->kind = 'F';
        }
    }
    errno = saved;
}

static void after_sync(struct pending *p, int rc) {
    if (!p->kind)
        return;
    int saved = errno;
    if (rc != 0) {
        char dest[PATH_MAX + 128];
        snprintf(dest, sizeof dest, "%s/snap/%s", log_dir, p->snap);
        real_unlink(dest);
    } else if (p->kind == 'F') {
        emit("F %llu %d %lu %s %llu %s %s", now_ns() + mutate_late, (int)getpid(), p->seq, p->ident,
             p->size,
             p->snap, p->rel);
    } else {
        emit("D %llu %d %lu %s %s", now_ns() + mutate_late, (int)getpid(), p->seq, p->rel,
             p->snap);
    }
    errno = saved;
}

int fsync(int fd) {
    struct pending p;
    before_sync(fd, "fsync", &p);
    int rc = REAL(fsync)(fd);
    after_sync(&p, rc);
    return rc;
}

int fdatasync(int fd) {
    struct pending p;
    before_sync(fd, "fdatasync", &p);
    int rc = REAL(fdatasync)(fd);
    after_sync(&p, rc);
    return rc;
}

/* syncfs: everything under the tree, as it was when the call began, is durable after it. */
struct walked {
    int kind;
    char rel[PATH_MAX];
    char snap[64];
    char ident[64];
    unsigned long seq;
    unsigned long long size;
};

static int walk(const char *abs, const char *rel, struct walked **items, size_t *count,
                size_t *cap) {
    int fd = REAL(open)(abs, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return 0;
    struct statx sx;
    if (statx_fd(fd, &sx) != 0 || !(S_ISDIR(sx.stx_mode) || S_ISREG(sx.stx_mode))) {
        real_close(fd);
        return 0;
    }
    if (*count == *cap) {
        *cap = *cap ? *cap * 2 : 64;
        *items = realloc(*items, *cap * sizeof **items);
    }
    struct walked *w = &(*items)[(*count)++];
    memset(w, 0, sizeof *w);
    snprintf(w->rel, sizeof w->rel, "%s", rel[0] ? rel : ".");
    w->seq = next_seq();
    snprintf(w->snap, sizeof w->snap, "%d-%lu", (int)getpid(), w->seq);
    if (S_ISREG(sx.stx_mode)) {
        if (mutate_file[0] && strstr(w->rel, mutate_file)) {
            w->kind = 'M';
        } else if (copy_content(fd, w->snap) == 0) {
            w->kind = 'F';
            ident_of(&sx, w->ident, sizeof w->ident);
            w->size = sx.stx_size;
        }
        real_close(fd);
        return 0;
    }
    w->kind = mutate_dirsync ? 'M' : (list_entries(fd, w->snap) == 0 ? 'D' : 0);
    DIR *dir = fdopendir(fd);
    if (!dir) {
        real_close(fd);
        return 0;
    }
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0)
            continue;
        char child_abs[PATH_MAX], child_rel[PATH_MAX];
        snprintf(child_abs, sizeof child_abs, "%s/%s", abs, entry->d_name);
        snprintf(child_rel, sizeof child_rel, "%s%s%s", rel, rel[0] ? "/" : "", entry->d_name);
        walk(child_abs, child_rel, items, count, cap);
    }
    closedir(dir);
    return 0;
}

int syncfs(int fd) {
    if (!active)
        return REAL(syncfs)(fd);
    int saved = errno;
    pthread_mutex_lock(&syncfs_lock);
    struct walked *items = NULL;
    size_t count = 0, cap = 0;
    walk(data_dir, "", &items, &count, &cap);
    errno = saved;
    int rc = REAL(syncfs)(fd);
    saved = errno;
    if (rc == 0) {
        unsigned long long t = now_ns() + mutate_late;
        int pid = (int)getpid();
        emit("S %llu %d %lu", t, pid, next_seq());
        for (size_t i = 0; i < count; i++) {
            struct walked *w = &items[i];
            if (w->kind == 'F')
                emit("F %llu %d %lu %s %llu %s %s", t, pid, w->seq, w->ident, w->size, w->snap,
                     w->rel);
            else if (w->kind == 'D')
                emit("D %llu %d %lu %s %s", t, pid, w->seq, w->rel, w->snap);
            else if (w->kind == 'M')
                emit("M %llu %d %lu syncfs %s", t, pid, w->seq, w->rel);
        }
    }
    pthread_mutex_unlock(&syncfs_lock);
    free(items);
    errno = saved;
    return rc;
}

/* Descriptors opened under the tree with O_SYNC or O_DSYNC. */
static void track_open(int fd, int dirfd, const char *path, int flags) {
    if (fd < 0 || fd >= MAX_TRACKED_FD)
        return;
    sync_fd[fd] = 0;
    if (!active || !(flags & (O_SYNC | O_DSYNC)))
        return;
    char buf[PATH_MAX];
    if (relative(absolute(dirfd, path, buf, sizeof buf)))
        sync_fd[fd] = 1;
}

/* After a write on an O_SYNC/O_DSYNC descriptor: the file as it is now is durable. */
static void after_sync_write(int fd, ssize_t rc) {
    if (rc < 0 || fd < 0 || fd >= MAX_TRACKED_FD || !sync_fd[fd])
        return;
    struct pending p;
    before_sync(fd, "dsync-write", &p);
    after_sync(&p, 0);
}

#define OPEN_MODE(flags, mode)                                                                    \
    mode_t mode = 0;                                                                              \
    if ((flags) & (O_CREAT | O_TMPFILE)) {                                                        \
        va_list ap;                                                                               \
        va_start(ap, flags);                                                                      \
        mode = va_arg(ap, mode_t);                                                                \
        va_end(ap);                                                                               \
    }

int open(const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    int fd = REAL(open)(path, flags, mode);
    track_open(fd, AT_FDCWD, path, flags);
    return fd;
}

int open64(const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    int fd = REAL(open64)(path, flags, mode);
    track_open(fd, AT_FDCWD, path, flags);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    int fd = REAL(openat)(dirfd, path, flags, mode);
    track_open(fd, dirfd, path, flags);
    return fd;
}

int openat64(int dirfd, const char *path, int flags, ...) {
    OPEN_MODE(flags, mode);
    int fd = REAL(openat64)(dirfd, path, flags, mode);
    track_open(fd, dirfd, path, flags);
    return fd;
}

int creat(const char *path, mode_t mode) {
    int fd = REAL(creat)(path, mode);
    track_open(fd, AT_FDCWD, path, 0);
    return fd;
}

int creat64(const char *path, mode_t mode) {
    int fd = REAL(creat64)(path, mode);
    track_open(fd, AT_FDCWD, path, 0);
    return fd;
}

int close(int fd) {
    if (fd >= 0 && fd < MAX_TRACKED_FD)
        sync_fd[fd] = 0;
    return REAL(close)(fd);
}

ssize_t write(int fd, const void *buf, size_t len) {
    ssize_t rc = REAL(write)(fd, buf, len);
    after_sync_write(fd, rc);
    return rc;
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t at) {
    ssize_t rc = REAL(pwrite)(fd, buf, len, at);
    after_sync_write(fd, rc);
    return rc;
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off64_t at) {
    ssize_t rc = REAL(pwrite64)(fd, buf, len, at);
    after_sync_write(fd, rc);
    return rc;
}

ssize_t writev(int fd, const struct iovec *iov, int n) {
    ssize_t rc = REAL(writev)(fd, iov, n);
    after_sync_write(fd, rc);
    return rc;
}

ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t at) {
    ssize_t rc = REAL(pwritev)(fd, iov, n, at);
    after_sync_write(fd, rc);
    return rc;
}

/* Namespace changes: recorded only as moments worth cutting at (just after a rename, before
 * the directory fsync that makes it durable). */
static void note_path(char kind, int dirfd, const char *path) {
    if (!active)
        return;
    char buf[PATH_MAX];
    const char *rel = relative(absolute(dirfd, path, buf, sizeof buf));
    if (rel)
        emit("%c %llu %d %lu %s", kind, now_ns(), (int)getpid(), next_seq(), rel[0] ? rel : ".");
}

static void note_rename(int olddirfd, const char *from, int newdirfd, const char *to) {
    if (!active)
        return;
    char a[PATH_MAX], b[PATH_MAX];
    const char *rf = relative(absolute(olddirfd, from, a, sizeof a));
    const char *rt = relative(absolute(newdirfd, to, b, sizeof b));
    if (rf || rt)
        emit("R %llu %d %lu %s -> %s", now_ns(), (int)getpid(), next_seq(), rf ? rf : "?",
             rt ? rt : "?");
}

int rename(const char *from, const char *to) {
    int rc = REAL(rename)(from, to);
    if (rc == 0)
        note_rename(AT_FDCWD, from, AT_FDCWD, to);
    return rc;
}

int renameat(int olddirfd, const char *from, int newdirfd, const char *to) {
    int rc = REAL(renameat)(olddirfd, from, newdirfd, to);
    if (rc == 0)
        note_rename(olddirfd, from, newdirfd, to);
    return rc;
}

int renameat2(int olddirfd, const char *from, int newdirfd, const char *to, unsigned int flags) {
    int rc = REAL(renameat2)(olddirfd, from, newdirfd, to, flags);
    if (rc == 0)
        note_rename(olddirfd, from, newdirfd, to);
    return rc;
}

int unlink(const char *path) {
    int rc = REAL(unlink)(path);
    if (rc == 0)
        note_path('U', AT_FDCWD, path);
    return rc;
}

int unlinkat(int dirfd, const char *path, int flags) {
    int rc = REAL(unlinkat)(dirfd, path, flags);
    if (rc == 0)
        note_path('U', dirfd, path);
    return rc;
}

int mkdir(const char *path, mode_t mode) {
    int rc = REAL(mkdir)(path, mode);
    if (rc == 0)
        note_path('K', AT_FDCWD, path);
    return rc;
}
