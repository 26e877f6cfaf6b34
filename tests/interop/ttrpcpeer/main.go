// ttrpcpeer: a ttRPC peer built on containerd's Go ttrpc library, used to check that our
// Python implementation interoperates with the reference one, and to benchmark against it.
//
//	ttrpcpeer server -addr /path.sock             serve grpc.Health + test.Echo
//	ttrpcpeer client -addr /path.sock             run interop checks, print JSON results
//	ttrpcpeer bench  -addr /path.sock -n N -c C   unary grpc.Health/Check load, print JSON
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Wire shapes of the agent API's grpc.Health messages (health.proto), declared with
// protobuf struct tags the way ttrpc's own envelope types are.
type CheckRequest struct {
	Service string `protobuf:"bytes,1,opt,name=service,proto3"`
}

func (m *CheckRequest) Reset()         { *m = CheckRequest{} }
func (m *CheckRequest) String() string { return fmt.Sprintf("%+v", *m) }
func (*CheckRequest) ProtoMessage()    {}

type HealthCheckResponse struct {
	Status int32 `protobuf:"varint,1,opt,name=status,proto3"`
}

func (m *HealthCheckResponse) Reset()         { *m = HealthCheckResponse{} }
func (m *HealthCheckResponse) String() string { return fmt.Sprintf("%+v", *m) }
func (*HealthCheckResponse) ProtoMessage()    {}

type VersionCheckResponse struct {
	GrpcVersion  string `protobuf:"bytes,1,opt,name=grpc_version,proto3"`
	AgentVersion string `protobuf:"bytes,2,opt,name=agent_version,proto3"`
}

func (m *VersionCheckResponse) Reset()         { *m = VersionCheckResponse{} }
func (m *VersionCheckResponse) String() string { return fmt.Sprintf("%+v", *m) }
func (*VersionCheckResponse) ProtoMessage()    {}

func serve(addr string) error {
	s, err := ttrpc.NewServer()
	if err != nil {
		return err
	}
	s.Register("grpc.Health", map[string]ttrpc.Method{
		"Check": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req CheckRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &HealthCheckResponse{Status: 1}, nil
		},
		"Version": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req CheckRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &VersionCheckResponse{GrpcVersion: "0.0.1", AgentVersion: "go-ttrpc-peer"}, nil
		},
	})
	s.Register("test.Echo", map[string]ttrpc.Method{
		"Echo": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req ttrpc.KeyValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &req, nil
		},
		"Metadata": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req ttrpc.KeyValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			md, _ := ttrpc.GetMetadata(ctx)
			b, _ := json.Marshal(md)
			return &ttrpc.KeyValue{Key: "metadata", Value: string(b)}, nil
		},
		"Sleep": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req ttrpc.KeyValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(time.Hour):
				return &req, nil
			}
		},
		"Fail": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			return nil, status.Errorf(codes.NotFound, "go peer: asked to fail")
		},
	})
	os.Remove(addr)
	l, err := net.Listen("unix", addr)
	if err != nil {
		return err
	}
	fmt.Println("ready")
	go func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
		<-ch
		s.Close()
	}()
	if err := s.Serve(context.Background(), l); err != nil && err != ttrpc.ErrServerClosed {
		return err
	}
	return nil
}

type result struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

func dial(addr string) (*ttrpc.Client, error) {
	conn, err := net.Dial("unix", addr)
	if err != nil {
		return nil, err
	}
	return ttrpc.NewClient(conn), nil
}

func client(addr string) error {
	c, err := dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	var results []result
	add := func(name string, ok bool, detail string) { results = append(results, result{name, ok, detail}) }
	ctx := context.Background()

	var hc HealthCheckResponse
	err = c.Call(ctx, "grpc.Health", "Check", &CheckRequest{}, &hc)
	add("check", err == nil && hc.Status == 1, fmt.Sprintf("err=%v status=%d", err, hc.Status))

	var vr VersionCheckResponse
	err = c.Call(ctx, "grpc.Health", "Version", &CheckRequest{}, &vr)
	add("version", err == nil && vr.AgentVersion != "" && vr.GrpcVersion != "",
		fmt.Sprintf("err=%v agent=%q api=%q", err, vr.AgentVersion, vr.GrpcVersion))

	var empty HealthCheckResponse
	err = c.Call(ctx, "grpc.AgentService", "NoSuchMethod", &CheckRequest{}, &empty)
	add("unknown-method", status.Code(err) == codes.Unimplemented, fmt.Sprintf("err=%v", err))
	err = c.Call(ctx, "no.SuchService", "Check", &CheckRequest{}, &empty)
	add("unknown-service", status.Code(err) == codes.Unimplemented, fmt.Sprintf("err=%v", err))

	mdctx := ttrpc.WithMetadata(ctx, ttrpc.MD{"x-go-key": []string{"v1", "v2"}})
	var kv ttrpc.KeyValue
	err = c.Call(mdctx, "test.Echo", "Metadata", &ttrpc.KeyValue{}, &kv)
	add("metadata", err == nil && kv.Value != "", fmt.Sprintf("err=%v value=%s", err, kv.Value))

	dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	start := time.Now()
	err = c.Call(dctx, "test.Echo", "Sleep", &ttrpc.KeyValue{Value: "30"}, &kv)
	cancel()
	took := time.Since(start)
	code := status.Code(err)
	add("deadline", (code == codes.DeadlineExceeded || err == context.DeadlineExceeded) && took < 5*time.Second,
		fmt.Sprintf("err=%v took=%v", err, took))

	// many calls in flight on the one connection
	var wg sync.WaitGroup
	var mu sync.Mutex
	bad := 0
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var out ttrpc.KeyValue
			key := fmt.Sprint(i)
			if err := c.Call(ctx, "test.Echo", "Echo", &ttrpc.KeyValue{Key: key}, &out); err != nil || out.Key != key {
				mu.Lock()
				bad++
				mu.Unlock()
			}
		}(i)
	}
	wg.Wait()
	add("concurrent", bad == 0, fmt.Sprintf("bad=%d", bad))

	return json.NewEncoder(os.Stdout).Encode(results)
}

func bench(addr string, n, conc int) error {
	c, err := dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx := context.Background()
	// warm up
	for i := 0; i < 200; i++ {
		var hc HealthCheckResponse
		if err := c.Call(ctx, "grpc.Health", "Check", &CheckRequest{}, &hc); err != nil {
			return err
		}
	}
	lat := make([]time.Duration, n)
	var next int64
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				i := next
				next++
				mu.Unlock()
				if i >= int64(n) {
					return
				}
				t0 := time.Now()
				var hc HealthCheckResponse
				if err := c.Call(ctx, "grpc.Health", "Check", &CheckRequest{}, &hc); err != nil {
					fmt.Fprintln(os.Stderr, "call failed:", err)
					os.Exit(1)
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	total := time.Since(start)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	out := map[string]float64{
		"calls":        float64(n),
		"calls_per_s":  float64(n) / total.Seconds(),
		"p50_us":       float64(lat[n/2].Microseconds()),
		"p99_us":       float64(lat[n*99/100].Microseconds()),
		"concurrency":  float64(conc),
		"wall_seconds": total.Seconds(),
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ttrpcpeer server|client|bench -addr PATH [-n N -c C]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	addr := fs.String("addr", "", "unix socket path")
	n := fs.Int("n", 5000, "calls (bench)")
	conc := fs.Int("c", 1, "concurrent callers (bench)")
	fs.Parse(os.Args[2:])
	var err error
	switch os.Args[1] {
	case "server":
		err = serve(*addr)
	case "client":
		err = client(*addr)
	case "bench":
		err = bench(*addr, *n, *conc)
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ttrpcpeer:", err)
		os.Exit(1)
	}
}
