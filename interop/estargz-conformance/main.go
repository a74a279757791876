// Command estargz-conformance is a reference oracle for lazypull's eStargz /
// zstd:chunked support. It links against the upstream Go implementation
// (github.com/containerd/stargz-snapshotter/estargz, as packaged by Debian)
// and exposes two operations:
//
//	estargz-conformance verify [-toc-digest sha256:HEX] BLOB
//	estargz-conformance build [-chunk-size N] [-level L] [-zstd] [-prioritized a,b,c] IN.tar OUT.blob
//
// See README.md in this directory for the output formats and exit codes.
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

const (
	exitOK       = 0
	exitInvalid  = 1 // the blob (or the build input) was rejected
	exitUsageErr = 2 // bad arguments or a local I/O problem
)

const prog = "estargz-conformance"

// exitError carries the process exit status together with a message.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func usageErr(format string, args ...interface{}) error {
	return &exitError{exitUsageErr, fmt.Sprintf(format, args...)}
}

func invalid(format string, args ...interface{}) error {
	return &exitError{exitInvalid, fmt.Sprintf(format, args...)}
}

const topUsage = `usage:
  ` + prog + ` verify [-toc-digest sha256:HEX] BLOB
  ` + prog + ` build [-chunk-size N] [-level L] [-zstd] [-prioritized a,b,c] IN.tar OUT.blob`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, topUsage)
		os.Exit(exitUsageErr)
	}
	var err error
	switch os.Args[1] {
	case "verify":
		err = runVerify(os.Args[2:])
	case "build":
		err = runBuild(os.Args[2:])
	case "-h", "-help", "--help", "help":
		fmt.Println(topUsage)
		return
	default:
		err = usageErr("unknown subcommand %q\n%s", os.Args[1], topUsage)
	}
	if err == nil {
		os.Exit(exitOK)
	}
	var ee *exitError
	if errors.As(err, &ee) {
		fmt.Fprintf(os.Stderr, "%s: %s\n", prog, ee.msg)
		os.Exit(ee.code)
	}
	fmt.Fprintf(os.Stderr, "%s: %v\n", prog, err)
	os.Exit(exitUsageErr)
}

// ---------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------

// entryRecord is one line of `verify` output. Every field is always present
// so that consumers can rely on a fixed schema.
type entryRecord struct {
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Size     int64             `json:"size"`
	Mode     int64             `json:"mode"`
	UID      int               `json:"uid"`
	GID      int               `json:"gid"`
	Uname    string            `json:"uname"`
	Gname    string            `json:"gname"`
	ModTime  string            `json:"modTime"`
	LinkName string            `json:"linkName"`
	DevMajor int               `json:"devMajor"`
	DevMinor int               `json:"devMinor"`
	Xattrs   map[string]string `json:"xattrs"`
	SHA256   string            `json:"sha256"`
	Digest   string            `json:"digest"`
	NumLink  int               `json:"numLink"`
	Chunks   int               `json:"chunks"`
}

// node is a path in the reader's directory tree together with the entry the
// library resolves it to. For a hardlink, ent is the link's source entry.
type node struct {
	path string
	ent  *estargz.TOCEntry
}

// fileResult is what checking one regular file's payload produced.
type fileResult struct {
	sha    string
	chunks int
}

func runVerify(args []string) error {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	wantTOC := fs.String("toc-digest", "", "expected TOC digest (sha256:HEX); when omitted, the digest computed by the library is used")
	if err := fs.Parse(args); err != nil {
		return usageErr("verify: %v", err)
	}
	if fs.NArg() != 1 {
		return usageErr("verify: exactly one BLOB argument expected\n%s", topUsage)
	}
	blobPath := fs.Arg(0)

	var expected digest.Digest
	if *wantTOC != "" {
		d, err := digest.Parse(*wantTOC)
		if err != nil {
			return usageErr("verify: -toc-digest %q: %v", *wantTOC, err)
		}
		expected = d
	}

	f, err := os.Open(blobPath)
	if err != nil {
		return usageErr("verify: %v", err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return usageErr("verify: %v", err)
	}
	blob := io.NewSectionReader(f, 0, info.Size())

	// estargz.Open always tries the gzip and legacy-gzip decompressors; the
	// option appends zstd:chunked as a further candidate.
	rd, err := estargz.Open(blob, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	if err != nil {
		return invalid("verify: %s: cannot open as eStargz or zstd:chunked: %v", blobPath, err)
	}

	computed := rd.TOCDigest()
	if expected == "" {
		expected = computed
	}
	verifiers, err := rd.VerifyTOC(expected)
	if err != nil {
		return invalid("verify: %s: TOC verification failed: %v", blobPath, err)
	}

	nodes, err := collectTree(rd)
	if err != nil {
		return invalid("verify: %s: %v", blobPath, err)
	}

	// Check the payload of each distinct regular file once, even if several
	// names (hardlinks) lead to it.
	results := map[*estargz.TOCEntry]fileResult{}
	var failures []string
	var totalChunks int
	var totalBytes int64
	for _, n := range nodes {
		e := n.ent
		if e.Type != "reg" {
			continue
		}
		if _, done := results[e]; done {
			continue
		}
		res, err := checkRegular(rd, verifiers, e)
		if err != nil {
			failures = append(failures, err.Error())
			results[e] = fileResult{}
			continue
		}
		results[e] = res
		totalChunks += res.chunks
		totalBytes += e.Size
	}
	if len(failures) > 0 {
		for _, msg := range failures {
			fmt.Fprintf(os.Stderr, "%s: FAIL %s\n", prog, msg)
		}
		return invalid("verify: %s: %d regular file(s) failed verification", blobPath, len(failures))
	}

	out := json.NewEncoder(os.Stdout)
	out.SetEscapeHTML(false)
	for _, n := range nodes {
		if err := out.Encode(makeRecord(n, results)); err != nil {
			return usageErr("verify: writing output: %v", err)
		}
	}

	fmt.Fprintf(os.Stderr, "%s: OK format=%s tocDigest=%s entries=%d regularFiles=%d chunks=%d bytes=%d\n",
		prog, guessFormat(f, info.Size()), computed, len(nodes), len(results), totalChunks, totalBytes)
	return nil
}

// collectTree walks the directory tree the library built, starting at the
// root (Lookup("")), and returns every reachable path sorted bytewise.
// The root itself is reported with the empty name.
func collectTree(rd *estargz.Reader) ([]node, error) {
	root, ok := rd.Lookup("")
	if !ok {
		return nil, errors.New("reader has no root directory")
	}
	var nodes []node
	stack := []node{{path: "", ent: root}}
	for len(stack) > 0 {
		cur := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		nodes = append(nodes, cur)
		// Only descend into a directory reached under its own name; a child
		// reached through a hardlink name is a leaf (and must not loop).
		if cur.ent.Type != "dir" || cur.ent.Name != cur.path {
			continue
		}
		cur.ent.ForeachChild(func(base string, child *estargz.TOCEntry) bool {
			p := base
			if cur.path != "" {
				p = cur.path + "/" + base
			}
			stack = append(stack, node{path: p, ent: child})
			return true
		})
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].path < nodes[j].path })
	return nodes, nil
}

// checkRegular verifies every chunk of a regular file against the TOC's
// chunk digests and hashes the whole payload. The payload is read chunk by
// chunk through the reader returned by OpenFile (one ReadAt per chunk, as the
// library decompresses from the chunk start on each ReadAt).
func checkRegular(rd *estargz.Reader, verifiers estargz.TOCEntryVerifier, e *estargz.TOCEntry) (fileResult, error) {
	name := e.Name
	whole := sha256.New()
	if e.Size == 0 {
		return fileResult{sha: hex.EncodeToString(whole.Sum(nil))}, nil
	}
	content, err := rd.OpenFile(name)
	if err != nil {
		return fileResult{}, fmt.Errorf("%s: OpenFile: %v", name, err)
	}

	var buf []byte
	var chunks int
	for off := int64(0); off < e.Size; {
		ce, ok := rd.ChunkEntryForOffset(name, off)
		if !ok {
			return fileResult{}, fmt.Errorf("%s offset %d: no chunk entry covers this offset", name, off)
		}
		if ce.ChunkOffset != off {
			return fileResult{}, fmt.Errorf("%s offset %d: chunk entry starts at %d, expected a chunk boundary here", name, off, ce.ChunkOffset)
		}
		n := ce.ChunkSize
		if n <= 0 || off+n > e.Size {
			return fileResult{}, fmt.Errorf("%s offset %d: bad chunk size %d (file size %d)", name, off, n, e.Size)
		}
		v, err := verifiers.Verifier(ce)
		if err != nil {
			return fileResult{}, fmt.Errorf("%s offset %d: no verifier: %v", name, off, err)
		}
		if int64(cap(buf)) < n {
			buf = make([]byte, n)
		}
		piece := buf[:n]
		if _, err := io.ReadFull(io.NewSectionReader(content, off, n), piece); err != nil {
			return fileResult{}, fmt.Errorf("%s offset %d: reading %d bytes: %v", name, off, n, err)
		}
		v.Write(piece)
		if !v.Verified() {
			return fileResult{}, fmt.Errorf("%s offset %d: chunk digest mismatch (chunk size %d, blob offset %d)", name, off, n, ce.Offset)
		}
		whole.Write(piece)
		chunks++
		off += n
	}

	sum := whole.Sum(nil)
	if e.Digest != "" {
		want, err := digest.Parse(e.Digest)
		if err != nil {
			return fileResult{}, fmt.Errorf("%s offset 0: unparsable file digest %q: %v", name, e.Digest, err)
		}
		if want.Algorithm() == digest.SHA256 && want.Encoded() != hex.EncodeToString(sum) {
			return fileResult{}, fmt.Errorf("%s offset 0: file content sha256:%x does not match TOC digest %s", name, sum, want)
		}
	}
	return fileResult{sha: hex.EncodeToString(sum), chunks: chunks}, nil
}

func makeRecord(n node, results map[*estargz.TOCEntry]fileResult) entryRecord {
	e := n.ent
	rec := entryRecord{
		Name:     n.path,
		Type:     e.Type,
		Size:     e.Size,
		Mode:     e.Mode,
		UID:      e.UID,
		GID:      e.GID,
		Uname:    e.Uname,
		Gname:    e.Gname,
		ModTime:  e.ModTime3339,
		LinkName: e.LinkName,
		DevMajor: e.DevMajor,
		DevMinor: e.DevMinor,
		Xattrs:   make(map[string]string, len(e.Xattrs)),
		NumLink:  e.NumLink,
	}
	for k, v := range e.Xattrs {
		rec.Xattrs[k] = base64.StdEncoding.EncodeToString(v)
	}
	if e.Type == "reg" {
		rec.SHA256 = results[e].sha
		rec.Chunks = results[e].chunks
		rec.Digest = e.Digest
	}
	// The library links a hardlink's name straight to the source entry, so a
	// path whose entry carries a different name was reached through a hardlink.
	if e.Name != n.path {
		rec.Type = "hardlink"
		rec.LinkName = e.Name
	}
	return rec
}

// guessFormat is informational only: it reports which footer the blob ends with.
func guessFormat(f *os.File, size int64) string {
	magic := []byte("GnUlInUx") // zstd:chunked footer magic
	if size < int64(len(magic)) {
		return "unknown"
	}
	tail := make([]byte, len(magic))
	if _, err := f.ReadAt(tail, size-int64(len(magic))); err != nil {
		return "unknown"
	}
	if bytes.Equal(tail, magic) {
		return "zstd:chunked"
	}
	return "gzip"
}

// ---------------------------------------------------------------------------
// build
// ---------------------------------------------------------------------------

// zstdCodec bundles the zstd:chunked compressor and decompressor into the
// estargz.Compression interface that WithCompression expects.
type zstdCodec struct {
	zstdchunked.Compressor
	zstdchunked.Decompressor
}

type buildResult struct {
	TOCDigest         string   `json:"tocDigest"`
	DiffID            string   `json:"diffID"`
	BlobSize          int64    `json:"blobSize"`
	BlobDigest        string   `json:"blobDigest"`
	MissedPrioritized []string `json:"missedPrioritized"`
}

func runBuild(args []string) error {
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	chunkSize := fs.Int("chunk-size", 0, "maximum chunk size in bytes (0: library default, 4 MiB)")
	level := fs.Int("level", 0, "compression level: gzip 0-9 (default 9), or zstd level for -zstd (default 3)")
	useZstd := fs.Bool("zstd", false, "produce zstd:chunked instead of gzip eStargz")
	prio := fs.String("prioritized", "", "comma-separated list of files to place first (prefetch set)")
	if err := fs.Parse(args); err != nil {
		return usageErr("build: %v", err)
	}
	if fs.NArg() != 2 {
		return usageErr("build: IN.tar and OUT.blob expected\n%s", topUsage)
	}
	levelGiven := false
	fs.Visit(func(fl *flag.Flag) {
		if fl.Name == "level" {
			levelGiven = true
		}
	})
	if *chunkSize < 0 {
		return usageErr("build: -chunk-size must not be negative")
	}

	in, err := os.Open(fs.Arg(0))
	if err != nil {
		return usageErr("build: %v", err)
	}
	defer in.Close()
	inInfo, err := in.Stat()
	if err != nil {
		return usageErr("build: %v", err)
	}

	missed := []string{}
	var opts []estargz.Option
	if *chunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(*chunkSize))
	}
	if *useZstd {
		zl := zstd.SpeedDefault
		if levelGiven {
			zl = zstd.EncoderLevelFromZstd(*level)
		}
		codec := &zstdCodec{}
		codec.Compressor.CompressionLevel = zl
		opts = append(opts, estargz.WithCompression(codec))
	} else if levelGiven {
		opts = append(opts, estargz.WithCompressionLevel(*level))
	}
	var prioritized []string
	for _, p := range strings.Split(*prio, ",") {
		if p = strings.TrimSpace(p); p != "" {
			prioritized = append(prioritized, p)
		}
	}
	if len(prioritized) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(prioritized))
	}
	opts = append(opts, estargz.WithAllowPrioritizeNotFound(&missed))

	blob, err := estargz.Build(io.NewSectionReader(in, 0, inInfo.Size()), opts...)
	if err != nil {
		return invalid("build: %s: %v", fs.Arg(0), err)
	}
	defer blob.Close()

	outPath := fs.Arg(1)
	out, err := os.Create(outPath)
	if err != nil {
		return usageErr("build: %v", err)
	}
	blobHash := sha256.New()
	written, copyErr := io.Copy(io.MultiWriter(out, blobHash), blob)
	closeErr := out.Close()
	if copyErr != nil || closeErr != nil {
		os.Remove(outPath)
		if copyErr == nil {
			copyErr = closeErr
		}
		return usageErr("build: writing %s: %v", outPath, copyErr)
	}

	res := buildResult{
		TOCDigest:         blob.TOCDigest().String(),
		DiffID:            blob.DiffID().String(),
		BlobSize:          written,
		BlobDigest:        "sha256:" + hex.EncodeToString(blobHash.Sum(nil)),
		MissedPrioritized: missed,
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(res); err != nil {
		return usageErr("build: writing output: %v", err)
	}
	return nil
}
