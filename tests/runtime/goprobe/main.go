// A small Go client and server for the seccomp door's tests (tests/runtime/test_seccomp.py).
// Standard library only; built once per test session with CGO_ENABLED=0 and =1.
//
//	goprobe get URL            GET URL: {"status", "bytes", "sha256"}
//	goprobe tcp HOST:PORT      the rig's echo server: {"local", "remote", "echo"}
//	goprobe dial HOST:PORT     {"error"} or {"local", "remote"}, and how long it took
//	goprobe lookup NAME        net.LookupHost with Go's own resolver: {"addrs"} or {"error"}
//	goprobe udp HOST:PORT      one datagram to an echo server: {"echo", "local", "remote"}
//	goprobe udpfrom HOST:PORT  the same from an unconnected socket: {"echo", "from"}
//	goprobe many N URL         N concurrent GETs: {"ok", "failed"}
//	goprobe serve ADDR         an HTTP server answering with the client's address
//	goprobe udpserve ADDR      a UDP server answering "CLIENT PAYLOAD"
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"
)

func out(v map[string]interface{}) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func fail(err error) {
	out(map[string]interface{}{"error": err.Error()})
	os.Exit(1)
}

func client() *http.Client {
	return &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
		Proxy: nil, MaxIdleConnsPerHost: 1000, DisableKeepAlives: false,
	}}
}

func main() {
	args := os.Args[1:]
	switch args[0] {
	case "get":
		resp, err := client().Get(args[1])
		if err != nil {
			fail(err)
		}
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		resp.Body.Close()
		if err != nil {
			fail(err)
		}
		out(map[string]interface{}{"status": resp.StatusCode, "bytes": n, "sha256": hex.EncodeToString(h.Sum(nil))})
	case "tcp":
		c, err := net.DialTimeout("tcp", args[1], 20*time.Second)
		if err != nil {
			fail(err)
		}
		c.SetDeadline(time.Now().Add(20 * time.Second))
		fmt.Fprintf(c, "hello from go\n")
		buf := make([]byte, 4096)
		got := ""
		for len(got) == 0 || got[len(got)-1] != '\n' {
			k, err := c.Read(buf)
			if err != nil {
				fail(err)
			}
			got += string(buf[:k])
		}
		out(map[string]interface{}{"local": c.LocalAddr().String(), "remote": c.RemoteAddr().String(), "echo": got})
		c.Close()
	case "dial":
		t0 := time.Now()
		c, err := net.DialTimeout("tcp", args[1], 30*time.Second)
		took := time.Since(t0).Seconds()
		if err != nil {
			out(map[string]interface{}{"error": err.Error(), "took": took})
			return
		}
		out(map[string]interface{}{"local": c.LocalAddr().String(), "remote": c.RemoteAddr().String(), "took": took})
		c.Close()
	case "lookup":
		r := &net.Resolver{PreferGo: true}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		addrs, err := r.LookupHost(ctx, args[1])
		if err != nil {
			fail(err)
		}
		out(map[string]interface{}{"addrs": addrs})
	case "udp":
		c, err := net.Dial("udp", args[1])
		if err != nil {
			fail(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 2048)
		for try := 0; ; try++ {
			c.Write([]byte("ping from go"))
			c.SetReadDeadline(time.Now().Add(time.Second))
			k, err := c.Read(buf)
			if err == nil {
				out(map[string]interface{}{"echo": string(buf[:k]), "local": c.LocalAddr().String(), "remote": c.RemoteAddr().String()})
				return
			}
			if try > 5 {
				fail(err)
			}
		}
	case "udpfrom":
		c, err := net.ListenPacket("udp", ":0")
		if err != nil {
			fail(err)
		}
		dst, err := net.ResolveUDPAddr("udp", args[1])
		if err != nil {
			fail(err)
		}
		buf := make([]byte, 2048)
		for try := 0; ; try++ {
			c.WriteTo([]byte("ping from go"), dst)
			c.SetReadDeadline(time.Now().Add(time.Second))
			k, from, err := c.ReadFrom(buf)
			if err == nil {
				out(map[string]interface{}{"echo": string(buf[:k]), "from": from.String()})
				return
			}
			if try > 5 {
				fail(err)
			}
		}
	case "many":
		n, _ := strconv.Atoi(args[1])
		var wg sync.WaitGroup
		var mu sync.Mutex
		ok, failed := 0, 0
		var first string
		start := make(chan struct{})
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				c, err := net.DialTimeout("tcp", args[2], 60*time.Second)
				if err == nil {
					c.SetDeadline(time.Now().Add(60 * time.Second))
					fmt.Fprintf(c, "x\n")
					buf := make([]byte, 256)
					_, err = c.Read(buf)
					c.Close()
				}
				mu.Lock()
				if err == nil {
					ok++
				} else {
					failed++
					if first == "" {
						first = err.Error()
					}
				}
				mu.Unlock()
			}()
		}
		close(start)
		wg.Wait()
		out(map[string]interface{}{"ok": ok, "failed": failed, "first_error": first})
	case "udpserve":
		c, err := net.ListenPacket("udp", args[1])
		if err != nil {
			fail(err)
		}
		out(map[string]interface{}{"listening": c.LocalAddr().String()})
		buf := make([]byte, 2048)
		for {
			k, from, err := c.ReadFrom(buf)
			if err != nil {
				fail(err)
			}
			c.WriteTo([]byte(from.String()+" "+string(buf[:k])), from)
		}
	case "serve":
		ln, err := net.Listen("tcp", args[1])
		if err != nil {
			fail(err)
		}
		out(map[string]interface{}{"listening": ln.Addr().String()})
		http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s %s\n", r.RemoteAddr, r.Host)
		}))
	default:
		fail(fmt.Errorf("unknown command %q", args[0]))
	}
}
