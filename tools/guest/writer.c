/*
 * csv-writer: the Linux test guest's disk workload (tools/guest/build-qemu-guest.sh
 * builds it static into the guest's initramfs).
 *
 * It appends fixed-size records to FILE, each with its sequence number,
 * a payload derived from it and a CRC-32 of both, and fdatasync(2)s
 * after every record: a record the writer has counted is on the disk.
 * Every INTERVAL_MS it sends a heartbeat line "hb SEQ" to HB (a serial
 * port the host turns into UDP datagrams, so one clock on the host times
 * the gaps). Every VERIFY records it rereads the whole file and checks
 * every record; it prints "verify ok N" or "verify BAD at N: why" to the
 * console and the heartbeat port. On start it verifies what is already
 * there and continues after the last record (a restart after failover).
 *
 * usage: csv-writer FILE HB INTERVAL_MS VERIFY
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define RECORD 512

static uint32_t crc_table[256];

static void crc_init(void) {
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc32(const unsigned char *p, size_t n) {
	uint32_t c = 0xffffffffu;
	while (n--)
		c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
	return c ^ 0xffffffffu;
}

/* A record: seq (8 bytes LE), payload, crc of everything before it (4 bytes). */
static void make(unsigned char *r, uint64_t seq) {
	memcpy(r, &seq, 8);
	for (size_t i = 8; i < RECORD - 4; i++)
		r[i] = (unsigned char)(seq * 131 + i * 7);
	uint32_t c = crc32(r, RECORD - 4);
	memcpy(r + RECORD - 4, &c, 4);
}

static int hb_fd = -1;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
	char line[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	if (hb_fd >= 0 && write(hb_fd, line, n) < 0) {
	}
	if (write(1, line, n) < 0) {
	}
}

/* Checks every record in fd; returns how many, or -1 (said why). */
static long verify(int fd) {
	unsigned char r[RECORD], want[RECORD];
	long n = 0;
	for (;;) {
		ssize_t got = pread(fd, r, RECORD, (off_t)n * RECORD);
		if (got == 0)
			return n;
		if (got != RECORD) {
			say("verify BAD at %ld: short read %zd (%s)", n, got, got < 0 ? strerror(errno) : "");
			return -1;
		}
		make(want, (uint64_t)n);
		if (memcmp(r, want, RECORD) != 0) {
			say("verify BAD at %ld: record differs", n);
			return -1;
		}
		n++;
	}
}

static uint64_t now_ms(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
	if (argc != 5) {
		fprintf(stderr, "usage: csv-writer FILE HB INTERVAL_MS VERIFY\n");
		return 2;
	}
	crc_init();
	hb_fd = open(argv[2], O_WRONLY | O_NOCTTY);
	long interval = atol(argv[3]), every = atol(argv[4]);
	int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
	if (fd < 0) {
		say("writer: open %s: %s", argv[1], strerror(errno));
		return 1;
	}
	long seq = verify(fd);
	if (seq < 0)
		return 1;
	say("verify ok %ld (start)", seq);
	/* A record cut short by a crash before its fdatasync is not counted. */
	if (ftruncate(fd, (off_t)seq * RECORD) != 0) {
		say("writer: truncate: %s", strerror(errno));
		return 1;
	}
	unsigned char r[RECORD];
	uint64_t next_hb = 0;
	for (;;) {
		make(r, (uint64_t)seq);
		if (pwrite(fd, r, RECORD, (off_t)seq * RECORD) != RECORD || fdatasync(fd) != 0) {
			say("writer: write %ld: %s", seq, strerror(errno));
			return 1;
		}
		seq++;
		if (every > 0 && seq % every == 0) {
			long n = verify(fd);
			if (n < 0)
				return 1;
			say("verify ok %ld", n);
		}
		uint64_t t = now_ms();
		if (t >= next_hb) {
			say("hb %ld", seq);
			next_hb = t + (uint64_t)interval;
		}
		usleep((useconds_t)interval * 1000 / 2);
	}
}
